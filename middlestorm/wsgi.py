"""The WSGI middleware: one store per thread in ``environ``, one transaction per request.

::

    from middlestorm import MiddleStorm

    app = MiddleStorm(app, "postgres://app@localhost/app")

    def view(environ, start_response):
        store = environ["storm.store"]       # or middlestorm.current_store
        store.add(Note("hello"))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"saved"]                    # committed before the 201 is sent
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import Token
from types import TracebackType
from typing import Any

from transaction.interfaces import ITransactionManager
from werkzeug.local import LocalProxy

from middlestorm import context, timing
from middlestorm.databases import DatabaseSpec
from middlestorm.errors import ConfigurationError
from middlestorm.lifecycle import CommitVeto, abort_quietly, default_commit_veto, end_transaction
from middlestorm.stores import DEFAULT_STORE, StoreRegistry

__all__ = ["MiddleStorm", "decorator", "make_middleware"]

log = logging.getLogger(__name__)

Environ = dict[str, Any]
Headers = list[tuple[str, str]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: Bodies with a declared Content-Length up to this many bytes are read
#: inside the transaction, so the commit happens before the status is sent.
DEFAULT_BUFFER_LIMIT = 1024 * 1024

#: The ``environ`` key naming the transaction manager a request is handled in.
MANAGER_KEY = "middlestorm.transaction_manager"


class MiddleStorm:
    """Give each request this thread's Storm store and one transaction.

    :param app: the WSGI application to wrap.
    :param database: the default store's database: a Storm ``Database``, a
        URI, or a :class:`StoreRegistry` to share with code outside WSGI.
    :param key: the ``environ`` key of the default store.
    :param stores: more named stores, name mapped to a ``Database`` or URI;
        reach them through ``environ[stores_key][name]`` or ``get_store(name)``.
    :param stores_key: the ``environ`` key of the request's store registry.
    :param transaction_manager: a thread-local transaction manager;
        ``transaction.manager`` by default.
    :param commit_veto: ``veto(environ, status, headers) -> bool``; true
        aborts. The default aborts 4xx and 5xx unless ``X-Tm: commit``.
    :param buffer_limit: a body with a Content-Length up to this many bytes
        (or a list) is produced before the commit and the status is sent
        after it; larger and unsized bodies are streamed, and the
        transaction ends when the server closes them.
    :param server_timing: add a ``Server-Timing`` header with the request's
        statement count and database time to responses sent after the
        commit. Off by default: it tells clients how long queries take.
    """

    def __init__(
        self,
        app: WSGIApp,
        database: DatabaseSpec | StoreRegistry,
        key: str = "storm.store",
        *,
        stores: Mapping[str, DatabaseSpec] | None = None,
        stores_key: str = "middlestorm.stores",
        transaction_manager: ITransactionManager | None = None,
        commit_veto: CommitVeto | None = default_commit_veto,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        server_timing: bool = False,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application (a callable), not {app!r}")
        if commit_veto is not None and not callable(commit_veto):
            raise TypeError(
                "commit_veto must be a callable veto(environ, status, headers) -> bool "
                f"or None, not {commit_veto!r}"
            )
        if isinstance(database, StoreRegistry):
            if stores or transaction_manager is not None:
                raise ConfigurationError(
                    "pass stores and transaction_manager to the StoreRegistry, "
                    "not to MiddleStorm, when MiddleStorm is given a registry"
                )
            self.registry = database
        else:
            extra = dict(stores or {})
            if DEFAULT_STORE in extra:
                raise ConfigurationError(
                    f"{DEFAULT_STORE!r} names the default store (the database argument); "
                    "give the other stores other names"
                )
            self.registry = StoreRegistry(
                {DEFAULT_STORE: database, **extra}, transaction_manager=transaction_manager
            )
        if not isinstance(buffer_limit, int) or buffer_limit < 0:
            raise ConfigurationError(
                f"buffer_limit must be a whole number >= 0, not {buffer_limit!r}"
            )
        self.app = app
        self.key = key
        self.stores_key = stores_key
        self.commit_veto = commit_veto
        self.buffer_limit = buffer_limit
        self.server_timing = server_timing
        self._default_store = LocalProxy(functools.partial(self.registry.get, None))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.app!r} {self.registry!r}>"

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        environ[self.key] = self._default_store
        environ[self.stores_key] = self.registry
        manager = self.registry.transaction_manager
        if environ.get(MANAGER_KEY) is manager:
            # An outer MiddleStorm owns this request's transaction; our stores join it.
            return self.app(environ, start_response)
        environ[MANAGER_KEY] = manager
        return _Exchange(self, environ, start_response).run()


class _Exchange:
    """One request and its response, and the transaction between them."""

    def __init__(self, middleware: MiddleStorm, environ: Environ, start_response: StartResponse):
        self.middleware = middleware
        self.environ = environ
        self._server_start_response = start_response
        self._server_write: Callable[[bytes], object] | None = None
        self._forward_at_once = False
        self.status: str | None = None
        self.headers: Headers = []
        self._exc_info: ExcInfo | None = None
        self._token: Token | None = None
        self.stats: timing.RequestStats | None = None

    def run(self) -> Iterable[bytes]:
        middleware = self.middleware
        middleware.registry.transaction_manager.begin()
        self._token = context.bind(middleware.registry)
        if middleware.server_timing or timing.log.isEnabledFor(logging.DEBUG):
            self.stats = timing.start()
        try:
            result = middleware.app(self.environ, self.start_response)
        except BaseException:
            self.fail()
            raise
        if self._body_is_complete(result):
            return self._commit_then_send(result)
        self._forward_at_once = True
        if self.status is not None:
            self._forward()
        return _StreamedBody(result, self)

    # -- what the application sees ------------------------------------

    def start_response(
        self, status: str, headers: Headers, exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        self.status, self.headers = status, headers
        if self._server_write is not None or self._forward_at_once:
            self._server_write = self._server_start_response(status, headers, exc_info)
        else:
            self._exc_info = exc_info
        return self.write

    def write(self, data: bytes) -> None:
        self._forward()
        assert self._server_write is not None
        self._server_write(data)

    # -- ending the transaction ----------------------------------------

    def _body_is_complete(self, result: Iterable[bytes]) -> bool:
        if self.status is None or self._server_write is not None:
            return False
        if isinstance(result, (list, tuple)) or self._has_no_body():
            return True
        length = _content_length(self.headers)
        return length is not None and length <= self.middleware.buffer_limit

    def _has_no_body(self) -> bool:
        """HEAD requests and 1xx, 204 and 304 responses have no body in HTTP."""
        if self.environ.get("REQUEST_METHOD") == "HEAD":
            return True
        code = (self.status or "")[:3]
        return code in ("204", "304") or code.startswith("1")

    def _commit_then_send(self, result: Iterable[bytes]) -> list[bytes]:
        try:
            try:
                body = list(result)
            finally:
                _close(result)
        except BaseException:
            self.fail()
            raise
        self.succeed()
        if self.stats is not None and self.middleware.server_timing:
            self.headers = [*self.headers, ("Server-Timing", self.stats.server_timing())]
        self._forward()
        return body

    def _forward(self) -> None:
        if self._server_write is None:
            assert self.status is not None
            self._server_write = self._server_start_response(
                self.status, self.headers, *([self._exc_info] if self._exc_info else [])
            )
            self._exc_info = None

    def succeed(self) -> None:
        """End the transaction of a response that was produced in full."""
        veto = self.middleware.commit_veto
        try:
            commit = veto is None or not veto(self.environ, self.status or "", self.headers)
        except BaseException:
            self.fail()
            raise
        started = time.perf_counter()
        outcome = "failed to commit"
        try:
            committed = end_transaction(self.middleware.registry, commit=commit)
            outcome = "committed" if committed else "aborted"
        finally:
            if self.stats is not None:
                self.stats.commit_seconds = time.perf_counter() - started
            self._done(outcome)

    def fail(self) -> None:
        """Abort, while the reason (an error, a disconnect) is raised elsewhere."""
        try:
            abort_quietly(self.middleware.registry.transaction_manager)
        finally:
            self._done("aborted")

    def _done(self, outcome: str) -> None:
        if self._token is not None:
            context.unbind(self._token)
            self._token = None
        stats = self.stats
        if stats is not None and timing.stop(stats):
            timing.log.debug(
                "%s %s -> %s, %s: %d statements in %.2f ms, commit or abort %.2f ms",
                self.environ.get("REQUEST_METHOD"),
                self.environ.get("PATH_INFO"),
                self.status,
                outcome,
                stats.statements,
                stats.seconds * 1000,
                stats.commit_seconds * 1000,
            )


class _StreamedBody:
    """A body produced while the server sends it; ``close()`` ends the transaction."""

    def __init__(self, result: Iterable[bytes], exchange: _Exchange) -> None:
        self._result = result
        self._iterator: Iterator[bytes] | None = None
        self._exchange = exchange
        self._exhausted = False
        self._failed = False
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            if self._iterator is None:
                self._iterator = iter(self._result)
            return next(self._iterator)
        except StopIteration:
            self._exhausted = True
            raise
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        exchange = self._exchange
        try:
            _close(self._result)
        except BaseException:
            exchange.fail()
            raise
        if not self._exhausted or self._failed:
            exchange.fail()
            return
        try:
            exchange.succeed()
        except Exception:
            log.error(
                "the commit failed after the response (%s) was sent to the client; "
                "the request's changes were rolled back",
                exchange.status,
            )
            raise


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def decorator(
    database: DatabaseSpec | StoreRegistry, key: str = "storm.store", **options: Any
) -> Callable[[WSGIApp], MiddleStorm]:
    """Wrap the decorated WSGI application in :class:`MiddleStorm`.

    ``@decorator("sqlite:app.db")`` above ``def app(environ, start_response)``
    is ``app = MiddleStorm(app, "sqlite:app.db")``.
    """
    return lambda app: MiddleStorm(app, database, key, **options)


def make_middleware(
    app: WSGIApp,
    global_conf: Mapping[str, str],
    db_uri: str | None = None,
    key: str = "storm.store",
) -> MiddleStorm:
    """The Paste Deploy filter factory (``egg:middlestorm#middlestorm``)::

        [filter:storm]
        use = egg:middlestorm#middlestorm
        db_uri = postgres://app@localhost/app

    ``db_uri`` may also come from the ``[DEFAULT]`` section.
    """
    db_uri = db_uri or global_conf.get("db_uri")
    if not db_uri:
        raise ConfigurationError(
            "the middlestorm filter needs a database: add 'db_uri = <URI>' to its "
            "section or to [DEFAULT]"
        )
    return MiddleStorm(app, db_uri, key)
