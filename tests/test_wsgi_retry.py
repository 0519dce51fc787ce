"""A request that fails on a transient error is run again, while the client has seen nothing."""

from __future__ import annotations

import io
import json
import logging
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import transaction
from transaction.interfaces import TransientError
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request, Response

from middlestorm import CommitInDoubtError, MiddleStorm, RetryPolicy, current_store
from tests.helpers import DataManager, call
from tests.models import Counter, Note

FAST = RetryPolicy(attempts=3, backoff=0.001)


def post(app, data: bytes, content_type: str):
    """POST ``data`` to ``app`` as a server would; the response's status and body."""
    environ = EnvironBuilder(method="POST", data=data, content_type=content_type).get_environ()
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return seen["status"], seen["headers"], body


def failing_first(attempts_seen: list[int], error: Exception | None = None):
    """A werkzeug app that records each attempt's body and fails the first attempt."""
    error = error or TransientError("a conflict")

    @Request.application
    def app(request):
        attempts_seen.append(request.environ["middlestorm.attempt"])
        body = request.get_data()
        current_store.add(Note(f"attempt {attempts_seen[-1]}: {len(body)} bytes"))
        if len(attempts_seen) == 1:
            raise error
        return Response(body, 201)

    return app


def test_a_request_that_meets_a_conflict_is_run_again_and_succeeds(db, middleware):
    attempts: list[int] = []

    @Request.application
    def app(request):
        attempts.append(request.environ["middlestorm.attempt"])
        counter = current_store.get(Counter, 1)
        if len(attempts) == 1:
            if db.kind == "postgres":  # another client's increment lands in between
                db.run("UPDATE counter SET value = value + 1 WHERE id = 1")
            else:  # SQLite serializes writers: no conflict to meet, so make one
                raise TransientError("a conflict")
        counter.value += 1
        current_store.flush()
        return Response(str(counter.value))

    response = call(middleware(app, retry=FAST))

    assert response.status == "200 OK"
    assert attempts == [1, 2]
    expected = 2 if db.kind == "postgres" else 1
    assert response.data == str(expected).encode() and db.counters()[0] == expected


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"body=a+note&tag=x%26y", "application/x-www-form-urlencoded"),
        (json.dumps({"body": "a note"}).encode(), "application/json"),
        (bytes(random.Random(7).randbytes(2 * 1024 * 1024)), "application/octet-stream"),
    ],
    ids=["form", "json", "2 MiB, spooled to a file"],
)
def test_the_request_body_is_the_same_on_the_retry(db, middleware, data, content_type):
    attempts: list[int] = []

    status, _, body = post(middleware(failing_first(attempts), retry=FAST), data, content_type)

    assert (status, attempts) == ("201 CREATED", [1, 2])
    assert body == data
    assert db.notes() == [f"attempt 2: {len(data)} bytes"]


def test_a_request_whose_body_is_over_the_replay_limit_is_not_run_again(db, middleware):
    attempts: list[int] = []
    app = middleware(failing_first(attempts), retry=FAST, replay_limit=1024)

    status, headers, _ = post(app, b"x" * 2048, "application/octet-stream")

    assert (status, "Retry-After" in headers) == ("503 Service Unavailable", True)
    assert attempts == [1]
    assert db.notes() == []


def test_a_bug_in_a_request_over_the_replay_limit_is_raised_as_it_is(db, middleware):
    attempts: list[int] = []
    app = middleware(failing_first(attempts, ValueError("a bug")), retry=FAST, replay_limit=10)

    with pytest.raises(ValueError, match="a bug"):
        post(app, b"x" * 2048, "application/octet-stream")


def test_a_request_out_of_attempts_gets_a_503_with_retry_after(db, middleware, caplog):
    attempts: list[int] = []

    def app(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        environ["storm.store"].add(Note("never saved"))
        raise TransientError("a conflict, every time")

    policy = RetryPolicy(attempts=4, backoff=0.001, retry_after=7)
    response = call(middleware(app, retry=policy))

    assert response.status == "503 Service Unavailable"
    assert dict(response.headers)["Retry-After"] == "7"
    assert attempts == [1, 2, 3, 4]
    assert db.notes() == []
    assert "attempt 4 of 4" in caplog.text and "a conflict, every time" in caplog.text


def test_a_request_past_the_deadline_is_not_run_again(db, middleware):
    attempts: list[int] = []

    def app(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        time.sleep(0.2)
        raise TransientError("slow conflict")

    policy = RetryPolicy(attempts=10, backoff=0.001, deadline=0.3)
    response = call(middleware(app, retry=policy))

    assert response.status == "503 Service Unavailable"
    assert attempts == [1, 2]


def test_a_request_whose_status_reached_the_client_is_not_run_again(db, middleware):
    attempts: list[int] = []

    def app(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        start_response("200 OK", [])("already sent")  # write(): the status is out
        raise TransientError("too late to run again")

    with pytest.raises(TransientError):
        call(middleware(app, retry=FAST))

    assert attempts == [1]


def test_a_committed_request_is_not_run_again_when_the_server_refuses_its_status(db, middleware):
    attempts: list[int] = []

    def app(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        environ["storm.store"].add(Note("committed once"))
        start_response("200 OK", [])
        return [b"ok"]

    def refusing(status, headers, exc_info=None):
        raise TransientError("a server that fails after the commit")

    with pytest.raises(TransientError):
        middleware(app, retry=FAST)(EnvironBuilder().get_environ(), refusing)

    assert attempts == [1]
    assert db.notes() == ["committed once"]


def test_a_commit_in_doubt_is_not_run_again(pg, pg_middleware, caplog):
    attempts: list[int] = []

    with pg.dying_at_commit() as body:

        def app(environ, start_response):
            attempts.append(environ["middlestorm.attempt"])
            environ["storm.store"].add(Note(body))  # the backend ends itself at COMMIT
            start_response("201 Created", [])
            return [b"saved?"]

        with pytest.raises(CommitInDoubtError):
            call(pg_middleware(app, retry=FAST))

    assert attempts == [1]
    assert "COMMIT is in doubt" in caplog.text


def test_a_permanent_error_is_raised_at_once(db, middleware):
    attempts: list[int] = []

    with pytest.raises(ValueError):
        post(middleware(failing_first(attempts, ValueError("bad")), retry=FAST), b"x", "text/plain")

    assert attempts == [1]


def test_retry_none_runs_each_request_once(db, middleware):
    attempts: list[int] = []

    with pytest.raises(TransientError):
        post(middleware(failing_first(attempts), retry=None), b"x", "text/plain")

    assert attempts == [1]


def test_a_locked_sqlite_database_is_waited_out(tmp_path):
    from tests.conftest import make_database

    db = make_database("sqlite", tmp_path)
    db.uri = db.uri.replace("timeout=10", "timeout=0.05")
    holder = sqlite3.connect(db.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a while
    threading.Timer(0.3, holder.rollback).start()

    def app(environ, start_response):
        environ["storm.store"].add(Note("after the lock"))
        environ["storm.store"].flush()
        start_response("201 Created", [])
        return [b""]

    middleware = MiddleStorm(app, db.uri, retry=RetryPolicy(attempts=8, backoff=0.2))
    try:
        response = call(middleware)
    finally:
        middleware.registry.release()
        holder.close()

    assert response.status == "201 Created"
    assert db.notes() == ["after the lock"]


def test_the_next_request_after_a_failed_commit_uses_the_same_connection(pg, pg_middleware):
    from tests.models import Tag

    def app(environ, start_response):
        store = environ["storm.store"]
        pid = store.execute("SELECT pg_backend_pid()").get_one()[0]
        if environ["PATH_INFO"] == "/bad":
            store.add(Tag(note_id=999_999))  # fails at COMMIT: a deferred foreign key
        start_response("200 OK", [])
        return [str(pid).encode()]

    app = pg_middleware(app)
    first = call(app, "/first").data
    with pytest.raises(Exception, match="foreign key|FOREIGN KEY"):
        call(app, "/bad")

    assert call(app, "/after").data == first


@pytest.mark.parametrize("isolation", ["repeatable-read", "serializable"])
def test_concurrent_increments_are_exact_and_answered_200_or_503(pg, isolation):
    uri = f"{pg.uri}&isolation={isolation}"

    backends: set[int] = set()

    @Request.application
    def increment(request):
        backends.add(current_store.execute("SELECT pg_backend_pid()").get_one()[0])
        counter = current_store.get(Counter, int(request.args["counter"]))
        counter.value += 1
        return Response("incremented")

    app = MiddleStorm(increment, uri)  # the default retry policy
    statuses: list[str] = []
    threads = 8

    def client(number: int) -> None:
        picks = random.Random(number)
        for _ in range(25):
            response = call(app, f"/?counter={picks.randint(1, 5)}")
            statuses.append(response.status)
        transaction.abort()
        app.registry.release()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client, range(threads)))

    assert set(statuses) <= {"200 OK", "503 Service Unavailable"}  # never a 500
    assert sum(pg.counters()) == statuses.count("200 OK")  # no lost or phantom increment
    assert statuses.count("200 OK") >= 0.99 * len(statuses)
    assert len(backends) <= threads  # a conflict costs no new connection


def test_a_retry_logs_its_cause_at_info(db, middleware, caplog):
    caplog.set_level(logging.INFO, "middlestorm.work")
    post(middleware(failing_first([]), retry=FAST), b"x", "text/plain")

    assert "transient error in attempt 1" in caplog.text and "a conflict" in caplog.text


@pytest.mark.parametrize(
    "transfer_encoding",
    ["chunked", None],
    ids=["chunked", "terminated by the server, without a header (an HTTP/2 gateway's)"],
)
def test_a_body_without_a_content_length_is_replayed(db, middleware, transfer_encoding):
    attempts: list[int] = []
    environ = EnvironBuilder(method="POST").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    if transfer_encoding:
        environ["HTTP_TRANSFER_ENCODING"] = transfer_encoding
    environ["wsgi.input"] = io.BytesIO(b"the order")
    environ["wsgi.input_terminated"] = True
    seen: list[bytes] = []

    def app(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        seen.append(environ["wsgi.input"].read())
        if len(attempts) == 1:
            raise TransientError("a conflict")
        start_response("200 OK", [])
        return [b""]

    list(middleware(app, retry=FAST)(environ, lambda *args: None))

    assert seen == [b"the order", b"the order"]


# -- never run again once something of it committed --------------------------------------


def conflicting_after(commit_first, db):
    """An app that commits something its own way, then meets a conflict once."""
    attempts: list[int] = []

    def app(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        store = environ["storm.store"]
        store.add(Note(f"paid, attempt {len(attempts)}"))
        commit_first(store)
        if len(attempts) == 1:
            raise TransientError("a conflict after the payment was committed")
        start_response("200 OK", [])
        return [b"ok"]

    return app, attempts


@pytest.mark.parametrize(
    "commit_first",
    [lambda store: store.commit(), lambda store: transaction.commit()],
    ids=["store.commit()", "transaction.commit()"],
)
def test_a_request_that_committed_part_of_its_work_is_not_run_again(db, middleware, commit_first):
    app, attempts = conflicting_after(commit_first, db)

    with pytest.raises(TransientError):
        call(middleware(app, retry=FAST))

    assert attempts == [1]
    assert db.notes() == ["paid, attempt 1"]  # once, not twice


def test_a_request_whose_inner_middleware_committed_is_not_run_again(db, middleware, tmp_path):
    from tests.conftest import make_database

    audit = make_database("sqlite", tmp_path / "audit")
    own_manager = transaction.ThreadTransactionManager()
    attempts: list[int] = []

    def record(environ, start_response):
        environ["storm.store"].add(Note(f"ordered, attempt {len(attempts)}"))
        start_response("201 Created", [])
        return [b""]

    inner = MiddleStorm(record, audit.uri, transaction_manager=own_manager)

    def outer(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        b"".join(inner(environ, lambda *args: None))  # commits on its own manager
        if len(attempts) == 1:
            raise TransientError("the outer request conflicts afterwards")
        start_response("200 OK", [])
        return [b""]

    try:
        with pytest.raises(TransientError):
            call(middleware(outer, retry=FAST))
    finally:
        inner.registry.release()

    assert attempts == [1]
    assert audit.notes() == ["ordered, attempt 1"]


class CommitsAtVote(DataManager):
    """A data manager that commits its own write in tpc_vote, as zope.sqlalchemy does."""

    def __init__(self, db, body: str) -> None:
        self.db, self.body, self.transaction_manager = db, body, transaction.manager

    def tpc_vote(self, txn) -> None:
        self.db.run(f"INSERT INTO note (body) VALUES ('{self.body}')")


def test_a_commit_failing_after_another_data_manager_committed_is_in_doubt(pg, pg_middleware):
    from tests.models import Tag

    attempts: list[int] = []

    def app(environ, start_response):
        attempts.append(environ["middlestorm.attempt"])
        transaction.get().join(CommitsAtVote(pg, f"charged, attempt {len(attempts)}"))
        environ["storm.store"].add(Tag(note_id=999_999))  # Storm's COMMIT fails
        start_response("200 OK", [])
        return [b""]

    with pytest.raises(CommitInDoubtError, match="other data managers"):
        call(pg_middleware(app, retry=FAST))

    assert attempts == [1] and pg.notes() == ["charged, attempt 1"]


def test_run_in_transaction_inside_a_request_joins_the_requests_transaction(db, middleware):
    from middlestorm import run_in_transaction

    seen = []

    def app(environ, start_response):
        environ["storm.store"].add(Note("the request's own"))
        registry = environ["middlestorm.stores"].registry
        run_in_transaction(registry, lambda: registry.get().add(Note("the unit's")))
        seen.append(db.notes())  # the unit committed nothing by itself
        start_response("200 OK", [])
        return [b""]

    call(middleware(app))

    assert seen == [[]]
    assert db.notes() == ["the request's own", "the unit's"]


def test_a_head_request_out_of_attempts_gets_a_503_without_a_body(db, middleware):
    def app(environ, start_response):
        raise TransientError("always")

    response = call(middleware(app, retry=FAST), method="HEAD")

    assert response.status == "503 Service Unavailable" and response.data == b""
