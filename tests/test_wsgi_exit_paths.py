"""Every way a request can end ends its transaction exactly once, and leaves nothing open."""

from __future__ import annotations

import contextlib
import http.client
import threading
import urllib.parse

import pytest
import transaction
from storm.exceptions import IntegrityError

from middlestorm import MiddleStorm, NoRequestError, StoreRegistry, get_store
from tests.helpers import call, start, streaming
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


def test_a_sized_body_whose_commit_fails_never_hands_over_its_last_chunk(db, middleware, ends):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "6")])

        def body():
            environ["storm.store"].add(Tag(note_id=999_999))
            yield b"abc"
            yield b"def"

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
