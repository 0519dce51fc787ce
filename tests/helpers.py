"""A WSGI caller that behaves like a server and remembers what it saw when."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wsgi import ClosingIterator

from tests.models import Note


@dataclass
class Exchange:
    """What a server saw of one request."""

    status: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    written: list[bytes] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    #: What ``on_status`` returned at the moment the status reached the server.
    seen_at_status: Any = None

    @property
    def data(self) -> bytes:
        return b"".join(self.written + self.body)


def start(
    app: Callable,
    path: str = "/",
    method: str = "GET",
    on_status: Callable[[], Any] | None = None,
    environ: dict | None = None,
) -> tuple[Exchange, Iterable[bytes]]:
    """Call ``app`` as a server would, up to the point where it has the body iterable."""
    exchange = Exchange()
    env = EnvironBuilder(path=path, method=method).get_environ()
    env.update(environ or {})

    def start_response(status, headers, exc_info=None):
        if exc_info is not None and exchange.written:
            raise exc_info[1].with_traceback(exc_info[2])
        exchange.status, exchange.headers = status, list(headers)
        if on_status is not None:
            exchange.seen_at_status = on_status()
        return exchange.written.append

    return exchange, app(env, start_response)


def call(app: Callable, path: str = "/", method: str = "GET", **options: Any) -> Exchange:
    """Call ``app``, read its whole body and close it, as a server would."""
    exchange, result = start(app, path, method, **options)
    try:
        for chunk in result:
            exchange.body.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return exchange


def streaming(*words: str, headers=(), closed: list | None = None) -> Callable:
    """An app whose generator body adds (and flushes) a note per chunk.

    ``closed``, if given, gets ``True`` appended when the body is closed.
    """

    def app(environ, start_response):
        store = environ["storm.store"]
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])

        def body():
            for word in words:
                store.add(Note(word))
                store.flush()
                yield word.encode()

        if closed is None:
            return body()
        return ClosingIterator(body(), lambda: closed.append(True))

    return app


def in_forked_child(function: Callable[[], object]) -> object:
    """Run ``function`` in a child made by ``os.fork()``; return what it returned.

    A child that raised fails the test with the child's traceback.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            try:
                outcome = {"value": function()}
            except BaseException:
                outcome = {"error": traceback.format_exc()}
            with os.fdopen(write_end, "w") as pipe:
                json.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(child, 0)
    outcome = json.loads(text)
    if "error" in outcome:
        pytest.fail(f"the forked child failed:\n{outcome['error']}")
    return outcome["value"]


class DataManager:
    """A data manager that does nothing: tests override the step they act in."""

    transaction_manager = None

    def abort(self, txn) -> None:
        pass

    def tpc_begin(self, txn) -> None:
        pass

    def commit(self, txn) -> None:
        pass

    def tpc_vote(self, txn) -> None:
        pass

    def tpc_finish(self, txn) -> None:
        pass

    def tpc_abort(self, txn) -> None:
        pass

    def sortKey(self) -> str:
        return "another data manager"
