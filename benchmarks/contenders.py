"""The same application four ways: bare, by hand, repoze.tm2 + ZStorm, middlestorm.

Every contender serves the same four routes with the same view code
(:data:`ROUTES`); they differ only in where the store comes from and who ends
the transaction:

* **bare**: no middleware and no store; it serves ``/nodb`` only (on the
  database routes it would be the same code as *by hand*, so it is left out
  there and *by hand* is the baseline);
* **by hand**: a ``threading.local`` store per thread, ``commit()`` after the
  view and ``rollback()`` if it raised, as applications write it today;
* **repoze.tm2**: ``repoze.tm.TM`` around the app, which takes its store from
  a ``storm.zope.zstorm.ZStorm`` (stores join ``transaction.manager``);
* **middlestorm**: ``middlestorm.MiddleStorm(app, uri)``, the app taking
  ``environ["storm.store"]``.

A view touches the store only on the database routes, and only the rows of
its contender (:class:`Ids`). :func:`served` is the
app a server process loads (``benchmarks.contenders:served``), configured by
``BENCH_CONTENDER``, ``BENCH_URI`` and ``BENCH_ROWS``.
"""

from __future__ import annotations

import gc
import json
import os
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from storm.database import create_database
from storm.locals import Int, Unicode
from storm.store import Store

from benchmarks import counting
from benchmarks.databases import DEFAULT_ROWS, TABLE

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class Row:
    """One row of the benchmark's table."""

    __storm_table__ = TABLE
    id = Int(primary=True)
    body = Unicode()
    counter = Int()


@dataclass(frozen=True)
class Ids:
    """The rows a contender uses: ``count`` ids from ``first`` (its own, so that
    contenders loaded one after the other never wait for each other's locks)."""

    first: int
    count: int

    def pick(self) -> int:
        return self.first + random.randrange(self.count)


@dataclass(frozen=True)
class Route:
    """A view: ``handler(store, ids)`` returns the body; ``store`` is None without a database."""

    name: str
    path: str
    method: str
    uses_db: bool
    handler: Callable[[Any, Ids], bytes]


def _no_db(store: Any, ids: Ids) -> bytes:
    return b"ok"


def _read(store: Any, ids: Ids) -> bytes:
    row = store.get(Row, ids.pick())
    return row.body.encode()


def _update(store: Any, ids: Ids) -> bytes:
    # One UPDATE, no SELECT first: two SQLite transactions that read and then
    # write meet SQLite's lock-upgrade deadlock and wait out the whole timeout.
    store.find(Row, Row.id == ids.pick()).set(counter=Row.counter + 1)
    return b"updated"


def _list(store: Any, ids: Ids) -> bytes:
    found = store.find(Row, Row.id >= ids.first).order_by(Row.id)[:50]
    return "\n".join(row.body for row in found).encode()


ROUTES = {
    route.name: route
    for route in (
        Route("nodb", "/nodb", "GET", False, _no_db),
        Route("read", "/read", "GET", True, _read),
        Route("update", "/update", "POST", True, _update),
        Route("list", "/list", "GET", True, _list),
    )
}
_BY_PATH = {route.path: route for route in ROUTES.values()}


def _respond(start_response: StartResponse, body: bytes) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _not_found(start_response: StartResponse) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


def bare(uri: str, ids: Ids) -> WSGIApp:
    """No middleware, no store: ``/nodb`` only."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        route = _BY_PATH.get(environ["PATH_INFO"])
        if route is None or route.uses_db:
            return _not_found(start_response)
        return _respond(start_response, route.handler(None, ids))

    return app


def by_hand(uri: str, ids: Ids) -> WSGIApp:
    """A ``threading.local`` store per thread; the app commits or rolls back itself."""
    database = create_database(uri)
    local = threading.local()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        route = _BY_PATH.get(environ["PATH_INFO"])
        if route is None:
            return _not_found(start_response)
        if not route.uses_db:
            return _respond(start_response, route.handler(None, ids))
        store = getattr(local, "store", None)
        if store is None:
            store = local.store = Store(database)
        try:
            body = route.handler(store, ids)
            store.commit()
        except BaseException:
            store.rollback()
            raise
        return _respond(start_response, body)

    return app


def repoze_zstorm(uri: str, ids: Ids) -> WSGIApp:
    """repoze.tm2's ``TM`` around an app that takes its store from a ``ZStorm``."""
    from repoze.tm import TM, default_commit_veto
    from storm.zope.zstorm import ZStorm

    zstorm = ZStorm()
    zstorm.set_default_uri("main", uri)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        route = _BY_PATH.get(environ["PATH_INFO"])
        if route is None:
            return _not_found(start_response)
        store = zstorm.get("main") if route.uses_db else None
        return _respond(start_response, route.handler(store, ids))

    return TM(app, commit_veto=default_commit_veto)


def middlestorm(uri: str, ids: Ids) -> WSGIApp:
    """``MiddleStorm(app, uri)``; the app takes ``environ["storm.store"]``."""
    from middlestorm import MiddleStorm

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        route = _BY_PATH.get(environ["PATH_INFO"])
        if route is None:
            return _not_found(start_response)
        store = environ["storm.store"] if route.uses_db else None
        return _respond(start_response, route.handler(store, ids))

    return MiddleStorm(app, uri)


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    build: Callable[[str, Ids], WSGIApp]
    index: int
    uses_db: bool = True

    def serves(self, route: Route) -> bool:
        return self.uses_db or not route.uses_db

    def app(self, uri: str, rows: int) -> WSGIApp:
        """The contender's app on ``uri``, using its own ``rows`` rows of the table."""
        return self.build(uri, Ids(self.index * rows + 1, rows))


CONTENDERS = {
    contender.name: contender
    for contender in (
        Contender("bare", "bare", bare, 0, uses_db=False),
        Contender("by-hand", "by hand", by_hand, 1),
        Contender("repoze", "repoze.tm2 + ZStorm", repoze_zstorm, 2),
        Contender("middlestorm", "middlestorm", middlestorm, 3),
    )
}
#: The contender ratios are taken to.
BASELINE = "by-hand"


def baseline_for(route: Route) -> str:
    """The contender a route's own cost is measured from: bare without a database."""
    return "bare" if not route.uses_db else BASELINE


_served: WSGIApp | None = None
_served_lock = threading.Lock()


def served(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The app a server process loads; ``/_bench/stats`` and ``/_bench/gc`` are the harness's."""
    global _served
    path = environ.get("PATH_INFO", "")
    if path.startswith("/_bench/"):
        if path == "/_bench/gc":
            gc.collect()
        body = json.dumps(
            {"connections": counting.connections_opened(), "pid": os.getpid()}
        ).encode()
        return _respond(start_response, body)
    if _served is None:
        with _served_lock:
            if _served is None:
                counting.count_connections()
                contender = CONTENDERS[os.environ["BENCH_CONTENDER"]]
                rows = int(os.environ.get("BENCH_ROWS", DEFAULT_ROWS))
                _served = contender.app(os.environ["BENCH_URI"], rows)
    return _served(environ, start_response)
