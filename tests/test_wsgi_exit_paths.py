"""Every way a request can end ends its transaction exactly once, and leaves nothing open."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import urllib.parse

import pytest
import transaction
from storm.exceptions import IntegrityError

from middlestorm import MiddleStorm, NoRequestError, StoreRegistry, get_store
from tests.helpers import call, in_forked_child, start, streaming
from tests.models import Note, Tag
from tests.servers import start_server
from tests.wsgi_apps import CHUNKS


class Ends:
    """A transaction synchronizer recording how each of this thread's transactions ended.

    A failed commit completes twice (the commit, then the abort that frees
    it): each transaction is counted once, by how it first ended.
    """

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self._seen: list[object] = []

    def newTransaction(self, txn) -> None:
        pass

    def beforeCompletion(self, txn) -> None:
        pass

    def afterCompletion(self, txn) -> None:
        if any(seen is txn for seen in self._seen):
            return
        self._seen.append(txn)
        status = str(txn.status)
        self.statuses.append(
            {"Committed": "committed", "Committing": "commit failed"}.get(status, "aborted")
        )


@pytest.fixture
def ends():
    """How the transactions begun during the test ended, in order."""
    transaction.manager.abort()
    recorder = Ends()
    transaction.manager.registerSynch(recorder)
    yield recorder.statuses
    transaction.manager.unregisterSynch(recorder)


def refusing_server(error: Exception):
    """A start_response that refuses the status, as a strict server does."""

    def start_response(status, headers, exc_info=None):
        raise error

    return start_response


# -- the application fails ----------------------------------------------------------


def test_an_app_that_raises_ends_its_transaction_once_by_abort(db, middleware, ends):
    def app(environ, start_response):
        environ["storm.store"].add(Note("lost"))
        environ["storm.store"].flush()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        call(middleware(app))

    assert ends == ["aborted"]
    assert db.notes() == [] and db.idle_in_transaction() == 0


def test_a_list_body_ends_its_transaction_once_by_commit(db, middleware, ends):
    def app(environ, start_response):
        environ["storm.store"].add(Note("kept"))
        start_response("200 OK", [])
        return [b"ok"]

    call(middleware(app))

    assert ends == ["committed"]
    assert db.notes() == ["kept"]


@pytest.mark.parametrize("body", ["list", "generator"])
def test_an_app_that_never_calls_start_response_is_refused_and_aborted_once(
    db, middleware, ends, body
):
    def app(environ, start_response):
        environ["storm.store"].add(Note("lost"))
        return [b"ok"] if body == "list" else iter([b"ok"])

    with pytest.raises(RuntimeError, match="without calling start_response"):
        call(middleware(app))

    assert ends == ["aborted"]
    assert db.notes() == [] and db.idle_in_transaction() == 0


def test_an_empty_chunk_before_start_response_is_allowed_and_the_body_committed(
    db, middleware, ends
):
    def app(environ, start_response):
        environ["storm.store"].add(Note("kept"))
        yield b""  # PEP 3333: start_response comes before the first body bytestring
        start_response("200 OK", [("Content-Length", "2")])
        yield b"ok"

    exchange = call(middleware(app))

    assert exchange.status == "200 OK" and b"".join(exchange.body) == b"ok"
    assert ends == ["committed"]
    assert db.notes() == ["kept"]


def test_a_streamed_body_whose_veto_raises_aborts_once(db, middleware, ends):
    def veto(environ, status, headers):
        raise KeyError("broken veto")

    with pytest.raises(KeyError):
        call(middleware(streaming("lost"), commit_veto=veto))

    assert ends == ["aborted"]
    assert db.notes() == [] and db.idle_in_transaction() == 0


def test_a_body_that_raises_while_streaming_aborts_once(db, middleware, ends):
    def app(environ, start_response):
        start_response("200 OK", [])

        def body():
            environ["storm.store"].add(Note("half"))
            environ["storm.store"].flush()
            yield b"half"
            raise RuntimeError("broken stream")

        return body()

    with pytest.raises(RuntimeError):
        call(middleware(app))

    assert ends == ["aborted"]
    assert db.notes() == [] and db.idle_in_transaction() == 0


def test_a_body_whose_close_raises_aborts_once_and_the_error_propagates(db, middleware, ends):
    class Body:
        def __init__(self, store) -> None:
            self.store = store

        def __iter__(self):
            self.store.add(Note("closing fails"))
            yield b"data"

        def close(self) -> None:
            raise OSError("close failed")

    def app(environ, start_response):
        start_response("200 OK", [])
        return Body(environ["storm.store"])

    with pytest.raises(OSError, match="close failed"):
        call(middleware(app))

    assert ends == ["aborted"]
    assert db.notes() == [] and db.idle_in_transaction() == 0


# -- the server refuses ---------------------------------------------------------------


def test_a_server_refusing_a_streamed_status_aborts_closes_the_body_and_unbinds(
    db, middleware, ends
):
    closed: list = []
    streamed = streaming("never sent", closed=closed)

    def started_app(environ, start_response):
        environ["storm.store"].add(Note("written before the status"))
        environ["storm.store"].flush()
        return streamed(environ, start_response)

    app = middleware(started_app)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    with pytest.raises(ValueError, match="refused"):
        app(environ, refusing_server(ValueError("refused header")))

    assert ends == ["aborted"]
    assert closed == [True]
    with pytest.raises(NoRequestError):
        get_store()
    assert db.notes() == [] and db.idle_in_transaction() == 0


def test_a_server_refusing_the_status_of_a_generator_app_aborts(db, middleware, ends):
    def app(environ, start_response):
        environ["storm.store"].add(Note("late status"))
        environ["storm.store"].flush()
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"never sent"

    body = middleware(app)({"REQUEST_METHOD": "GET"}, refusing_server(ValueError("refused")))
    with pytest.raises(ValueError, match="refused"):
        next(iter(body))

    assert ends == ["aborted"]
    assert db.notes() == [] and db.idle_in_transaction() == 0


def test_a_header_with_a_line_break_is_refused_before_anything_is_committed(db, middleware, ends):
    def app(environ, start_response):
        environ["storm.store"].add(Note("download"))
        name = "report.csv\r\nSet-Cookie: session=stolen"  # a user-supplied file name
        start_response("200 OK", [("Content-Disposition", f'attachment; filename="{name}"')])
        return [b"a,b\n"]

    with pytest.raises(ValueError, match="'Content-Disposition' holds a line break") as caught:
        call(middleware(app))

    assert "stolen" not in str(caught.value)
    assert ends == ["aborted"]
    assert db.notes() == []


def test_a_failed_write_aborts_even_when_the_app_carries_on(db, middleware, ends):
    def app(environ, start_response):
        write = start_response("200 OK", [])
        environ["storm.store"].add(Note("client gone"))
        with contextlib.suppress(OSError):  # an app that shrugs off a broken pipe
            write(b"first")
        return [b"rest"]

    def start_response(status, headers, exc_info=None):
        def write(data):
            raise BrokenPipeError("the client hung up")

        return write

    body = middleware(app)({"REQUEST_METHOD": "GET"}, start_response)
    assert list(body) == [b"rest"]
    body.close()

    assert ends == ["aborted"]
    assert db.notes() == []


# -- the client leaves, or the server never closes -------------------------------------


def test_a_client_leaving_mid_stream_aborts_once(db, middleware, ends):
    _, body = start(middleware(streaming("one", "two")))
    assert next(iter(body)) == b"one"

    body.close()
    body.close()

    assert ends == ["aborted"]
    assert db.notes() == [] and db.idle_in_transaction() == 0


def test_a_fully_sent_body_is_committed_even_if_the_server_never_closes_it(db, middleware, ends):
    _, body = start(middleware(streaming("one", "two")))

    assert list(body) == [b"one", b"two"]

    assert ends == ["committed"]
    assert db.notes() == ["one", "two"] and db.idle_in_transaction() == 0


def test_an_unclosed_body_is_rolled_back_when_its_thread_begins_the_next_request(
    db, middleware, ends, caplog
):
    app = middleware(streaming("abandoned", "never finished", closed=[]))
    _, body = start(app, "/first")
    assert next(iter(body)) == b"abandoned"

    call(middleware(streaming("next request")), "/second")

    assert ends == ["aborted", "committed"]
    assert "never closed the response to GET /first" in caplog.text
    assert db.notes() == ["next request"]
    body.close()  # a late close touches nothing
    assert ends == ["aborted", "committed"]


def test_a_body_closed_from_another_thread_leaves_that_threads_transaction_alone(pg):
    # On PostgreSQL: SQLite's write lock would keep the other thread from writing at all.
    app = MiddleStorm(streaming("one", "two"), pg.uri)
    _, body = start(app)
    assert next(iter(body)) == b"one"
    other = StoreRegistry({"main": pg.uri})

    def elsewhere() -> None:
        transaction.begin()
        other.get().add(Note("other thread's work"))
        body.close()  # a server closing the response from the wrong thread
        transaction.commit()
        other.release()

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join(30)

    assert pg.notes() == ["other thread's work"]
    call(app, "/next")  # the request's own thread moves on: its transaction is rolled back
    assert pg.notes() == ["other thread's work", "one", "two"]
    app.registry.release()


# -- the commit fails: the client never gets a complete response ---------------------------


def test_a_streamed_body_is_committed_before_its_last_chunk_is_handed_over(db, middleware):
    length = str(len(b"onetwo"))
    _, body = start(
        middleware(streaming("one", "two", headers=[("Content-Length", length)]), buffer_limit=2)
    )
    chunks = iter(body)

    assert (next(chunks), db.notes()) == (b"one", [])
    assert (next(chunks), db.notes()) == (b"two", ["one", "two"])


def test_an_unsized_streamed_body_is_committed_before_the_server_learns_it_ended(db, middleware):
    _, body = start(middleware(streaming("one", "two")))
    chunks = iter(body)
    assert [next(chunks), next(chunks)] == [b"one", b"two"]
    assert db.notes() == []

    with pytest.raises(StopIteration):
        next(chunks)
    assert db.notes() == ["one", "two"]


@pytest.mark.parametrize(
    "after", [[], [b""], [b"beyond the length"]], ids=["end", "empty", "extra"]
)
def test_a_sized_body_whose_commit_fails_never_hands_over_its_last_chunk(
    db, middleware, ends, after
):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "6")])

        def body():
            environ["storm.store"].add(Tag(note_id=999_999))
            yield b"abc"
            yield b"def"
            yield from after

        return body()

    _, body = start(middleware(app, buffer_limit=2))
    chunks = iter(body)
    assert next(chunks) == b"abc"

    with pytest.raises(IntegrityError):
        next(chunks)

    assert ends == ["commit failed"]
    assert db.query("SELECT count(*) FROM tag") == [(0,)]


def fetch(base_url: str, path: str) -> tuple[int, bytes, bool]:
    """``(status, body, complete)`` of a GET, reading until the server ends or cuts it."""
    parts = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        try:
            return response.status, response.read(), True
        except (http.client.IncompleteRead, ConnectionError) as error:
            partial = getattr(error, "partial", b"")
            return response.status, partial, False
    finally:
        connection.close()


SERVERS = {
    "gunicorn gthread": [
        "{python}", "-m", "gunicorn", "-k", "gthread", "--threads", "2", "-w", "1",
        "-b", "127.0.0.1:{port}", "tests.wsgi_apps:app",
    ],
    "waitress": [
        "{python}", "-m", "waitress", "--listen", "127.0.0.1:{port}", "--threads", "2",
        "tests.wsgi_apps:app",
    ],
}  # fmt: skip


@pytest.fixture(params=list(SERVERS))
def served(request, db, tmp_path):
    """tests.wsgi_apps under a real server process, on the test database."""
    server = start_server(SERVERS[request.param], db.uri, tmp_path / "server.log")
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/stream-failing-commit", "/sized-failing-commit"])
def test_a_real_server_never_delivers_a_complete_response_whose_commit_failed(served, db, path):
    status, body, complete = fetch(served.base_url, path)

    assert not (status == 200 and complete and body == b"".join(CHUNKS)), served.output[-2000:]
    assert db.notes() == [] and db.query("SELECT count(*) FROM tag") == [(0,)]
    assert fetch(served.base_url, "/stream-committed") == (200, b"".join(CHUNKS), True)
    assert db.notes() == ["/stream-committed"]


def test_waitress_refusing_a_streamed_header_leaves_no_transaction_open(db, tmp_path):
    server = start_server(SERVERS["waitress"], db.uri, tmp_path / "server.log")
    try:
        refused = fetch(server.base_url, "/hop-by-hop")
        db_after = (db.notes(), db.idle_in_transaction())
        next_one = fetch(server.base_url, "/stream-committed")
    finally:
        server.stop()

    assert refused[0] == 500, server.output[-2000:]
    assert "hop-by-hop" in server.output
    assert db_after == ([], 0)
    assert next_one == (200, b"".join(CHUNKS), True)


def test_bytes_sent_by_write_count_toward_the_content_length(db, middleware, ends):
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Length", "12")])
        environ["storm.store"].add(Tag(note_id=999_999))
        write(b"hello ")
        return iter([b"world!"])

    _, body = start(middleware(app, buffer_limit=2))

    with pytest.raises(IntegrityError):
        next(iter(body))  # "world!" would complete the response: the commit comes first
    assert ends == ["commit failed"]


def test_a_body_that_runs_out_in_another_thread_is_cut_short_not_left_uncommitted(db, middleware):
    from middlestorm import WrongThreadError

    def app(environ, start_response):
        environ["storm.store"].add(Note("saved?"))
        start_response("200 OK", [])
        return iter([b"saved?"])  # a body that needs no store: a server may run it anywhere

    _, body = start(middleware(app))
    outcome: list = []

    def serve_elsewhere() -> None:
        try:
            outcome.append(list(body))
        except Exception as error:
            outcome.append(error)

    worker = threading.Thread(target=serve_elsewhere)
    worker.start()
    worker.join(30)

    assert isinstance(outcome[0], WrongThreadError)
    call(middleware(streaming("next")))  # the request's thread moves on: rolled back
    assert db.notes() == ["next"]


def test_an_explicit_manager_serves_on_after_a_body_closed_from_another_thread(db):
    manager = transaction.ThreadTransactionManager()
    manager.explicit = True
    app = MiddleStorm(streaming("one", "two"), db.uri, transaction_manager=manager)
    _, body = start(app)
    assert next(iter(body)) == b"one"
    closer = threading.Thread(target=body.close)
    closer.start()
    closer.join(30)

    try:
        response = call(app, "/next")
    finally:
        app.registry.release()

    assert response.status == "200 OK"
    assert db.notes() == ["one", "two"]


def test_an_inner_middlewares_unclosed_stream_is_rolled_back_with_the_outer_one(pg, tmp_path):
    other_manager = transaction.ThreadTransactionManager()
    inner = MiddleStorm(streaming("inner", "more"), pg.uri, transaction_manager=other_manager)

    def routes(environ, start_response):
        if environ["PATH_INFO"] == "/reports":
            return inner(environ, start_response)
        start_response("200 OK", [])
        return [b"elsewhere"]

    outer = MiddleStorm(routes, pg.uri)
    _, body = start(outer, "/reports")
    assert next(iter(body)) == b"inner"  # the server never closes it

    call(outer, "/elsewhere")  # the thread's next request never reaches the inner app

    assert pg.idle_in_transaction() == 0
    assert pg.notes() == []
    inner.registry.release()
    outer.registry.release()


def test_an_environ_called_with_again_after_its_request_ended_gets_its_own_transaction(
    db, middleware
):
    from werkzeug.test import EnvironBuilder

    def app(environ, start_response):
        environ["storm.store"].add(Note(f"call {environ['middlestorm.attempt']}"))
        start_response("201 Created", [])
        return [b"saved"]

    wrapped = middleware(app)
    environ = EnvironBuilder().get_environ()
    for _ in range(2):  # a retry or cascade middleware in front calls again with it
        assert b"".join(wrapped(environ, lambda *args: None)) == b"saved"

    assert db.notes() == ["call 1", "call 1"]
    assert transaction.manager.get()._resources == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_does_not_take_its_parents_open_response_for_its_own(db, middleware):
    def counting(environ, start_response):
        count = environ["storm.store"].find(Note).count()  # reads: SQLite lets it past
        start_response("200 OK", [])  # the parent's pending write
        return [str(count).encode()]

    app = middleware(streaming("parent", "streaming"))
    reader = middleware(counting)
    _, body = start(app, "/parent")
    assert next(iter(body)) == b"parent"

    def serve_in_the_child() -> tuple[str, str]:
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("middlestorm").addHandler(handler)
        return call(reader, "/child").status or "", "\n".join(records)

    status, logged = in_forked_child(serve_in_the_child)
    body.close()

    assert status == "200 OK"
    assert "never closed" not in logged
