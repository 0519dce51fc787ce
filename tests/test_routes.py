"""A route asks for a read-only transaction or none; every transaction says whose request it was."""

from __future__ import annotations

import logging

import pytest
import transaction
from storm.exceptions import DisconnectionError
from transaction import ThreadTransactionManager
from transaction.interfaces import AlreadyInTransaction

from middlestorm import (
    MiddleStorm,
    MiddleStormError,
    NoRequestError,
    RetryPolicy,
    StoreRegistry,
    current_registry,
)
from middlestorm.routes import (
    MODE_KEY,
    USER_KEY,
    Mode,
    current,
    no_transaction,
    read_only,
    set_mode,
)
from tests.helpers import call, start
from tests.models import Note


def note_writer(body: str = "written"):
    def app(environ, start_response):
        environ["storm.store"].add(Note(body))
        environ["storm.store"].flush()
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"saved"]

    return app


def note_reader(environ, start_response):
    bodies = [note.body for note in environ["storm.store"].find(Note).order_by(Note.id)]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [", ".join(bodies).encode()]


# -- read-only ---------------------------------------------------------------


def test_a_read_only_route_cannot_write_and_nothing_is_saved(db, middleware):
    app = middleware(read_only(note_writer()))

    with pytest.raises(Exception, match="read-only transaction|readonly database"):
        call(app, method="POST")

    assert db.notes() == []


def test_a_read_only_route_reads_and_ends_with_a_rollback_not_a_commit(db, middleware, tracer):
    db.run("INSERT INTO note (body) VALUES ('kept')")
    app = middleware(read_only(note_reader))

    exchange = call(app)

    assert (exchange.status, exchange.data) == ("200 OK", b"kept")
    assert tracer.commits == 0 and tracer.rollbacks == 1


def test_a_read_only_route_leaves_the_connection_writable_for_the_next_request(db, middleware):
    reader = read_only(note_reader)
    writer = note_writer("after")

    def app(environ, start_response):
        route = reader if environ["PATH_INFO"] == "/read" else writer
        return route(environ, start_response)

    app = middleware(app)
    assert call(app, "/read").status == "200 OK"
    assert call(app, "/write", "POST").status == "201 Created"

    assert db.notes() == ["after"]


def test_a_read_only_route_stays_read_only_after_a_response_the_server_never_closed(db, middleware):
    def streamed(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"never", b"finished"])

    paths = {"/stream": streamed, "/write": read_only(note_writer())}
    app = middleware(
        lambda environ, start_response: paths[environ["PATH_INFO"]](environ, start_response)
    )
    start(app, "/stream")  # the server never iterates nor closes it

    with pytest.raises(Exception, match="read-only transaction|readonly database"):
        call(app, "/write", "POST")

    assert db.notes() == []


def test_the_mode_may_come_from_a_layer_in_front_of_the_middleware(db, middleware):
    app = middleware(note_writer())

    with pytest.raises(Exception, match="read-only transaction|readonly database"):
        call(app, method="POST", environ={MODE_KEY: "read-only"})

    assert db.notes() == []


def test_an_unknown_mode_in_environ_is_refused_naming_the_modes(db, middleware):
    app = middleware(note_writer())

    with pytest.raises(ValueError, match="'readonly': use one of 'request', 'read-only', 'none'"):
        call(app, method="POST", environ={MODE_KEY: "readonly"})

    assert db.notes() == []


def test_asking_for_a_mode_after_the_route_used_a_store_is_refused(db, middleware):
    def app(environ, start_response):
        environ["storm.store"].find(Note).count()
        set_mode(Mode.READ_ONLY)

    with pytest.raises(MiddleStormError, match="before the route uses a store"):
        call(middleware(app))


def test_asking_for_a_mode_outside_a_request_raises():
    with pytest.raises(NoRequestError, match="while MiddleStorm handles a request"):
        set_mode("read-only")


def test_the_decorators_keep_the_views_name_and_docstring():
    def report(environ, start_response):
        """Monthly report."""

    decorated = read_only(report)

    assert (decorated.__name__, decorated.__doc__, decorated.__wrapped__) == (
        "report",
        "Monthly report.",
        report,
    )


# -- no request transaction ------------------------------------------------------


def test_a_route_without_transaction_commits_its_units_of_work_on_their_own(db, middleware):
    @no_transaction
    def app(environ, start_response):
        with current_registry().transaction():
            environ["storm.store"].add(Note("own unit"))
        start_response("500 Internal Server Error", [])  # vetoes only a request transaction
        return [b""]

    assert call(middleware(app)).status == "500 Internal Server Error"

    assert db.notes() == ["own unit"]


def test_in_a_request_transaction_a_unit_of_work_joins_it_and_is_rolled_back_with_it(
    db, middleware
):
    def app(environ, start_response):
        with current_registry().transaction():
            environ["storm.store"].add(Note("joined"))
        start_response("500 Internal Server Error", [])
        return [b""]

    call(middleware(app))

    assert db.notes() == []


def test_a_route_without_transaction_rolls_back_what_it_left_open_and_warns(db, middleware, caplog):
    app = middleware(no_transaction(note_writer("left open")))

    with caplog.at_level(logging.WARNING, logger="middlestorm"):
        exchange = call(app, "/notes", "POST")

    assert exchange.status == "201 Created"
    assert db.notes() == []
    assert "POST /notes has no request transaction, but left one open" in caplog.text


def test_a_route_without_transaction_is_not_run_again_after_a_transient_failure(db, middleware):
    runs = []

    @no_transaction
    def app(environ, start_response):
        runs.append(1)
        with current_registry().transaction():
            environ["storm.store"].add(Note(f"run {len(runs)}"))
        raise DisconnectionError("the connection went away after the unit of work committed")

    with pytest.raises(DisconnectionError):
        call(middleware(app, retry=RetryPolicy(attempts=3, backoff=0)))

    assert len(runs) == 1 and db.notes() == ["run 1"]


# -- annotation --------------------------------------------------------------------


def annotations_of(app, middleware, **environ):
    seen = []

    def annotated(env, start_response):
        txn = transaction.get()
        txn.addAfterCommitHook(lambda ok: seen.append((ok, txn.description, txn.user)))
        return app(env, start_response)

    call(middleware(annotated), "/notes", "POST", environ=environ)
    return seen


def test_the_transaction_says_which_request_and_user_it_was(db, middleware):
    assert annotations_of(note_writer(), middleware, **{USER_KEY: "alice"}) == [
        (True, "POST /notes", "alice")
    ]


def test_the_servers_remote_user_names_the_user_when_the_app_does_not(db, middleware):
    assert annotations_of(note_writer(), middleware, REMOTE_USER="bob") == [
        (True, "POST /notes", "bob")
    ]


# -- found in review: other registries, inner middlewares, retries ---------------


def other_registry(tmp_path):
    """A registry of a database of its own, with a transaction manager of its own."""
    from tests.conftest import make_database

    database = make_database("sqlite", tmp_path / "other")
    registry = StoreRegistry({"main": database.uri}, transaction_manager=ThreadTransactionManager())
    return database, registry


def test_a_read_only_route_leaves_another_registrys_units_of_work_writable(
    db, middleware, tmp_path
):
    audit_db, audit = other_registry(tmp_path)

    @read_only
    def report(environ, start_response):
        with audit.transaction():
            audit.get().add(Note("report viewed"))
        start_response("200 OK", [])
        return [b""]

    try:
        assert call(middleware(report)).status == "200 OK"
    finally:
        audit.release()

    assert audit_db.notes() == ["report viewed"]


def test_a_mode_of_none_from_environ_reaches_an_inner_middleware(db, middleware, tmp_path):
    inner_db, inner_registry = other_registry(tmp_path)

    def view(environ, start_response):
        with inner_registry.transaction():
            inner_registry.get().add(Note("unit of work"))
        start_response("200 OK", [])
        return [b""]

    app = middleware(MiddleStorm(view, inner_registry))
    try:
        assert call(app, environ={MODE_KEY: "none"}).status == "200 OK"
    finally:
        inner_registry.release()

    assert inner_db.notes() == ["unit of work"]


def test_a_request_is_not_run_again_once_a_unit_of_work_in_it_committed(db, middleware, tmp_path):
    audit_db, audit = other_registry(tmp_path)
    runs = []

    def app(environ, start_response):
        runs.append(1)
        with audit.transaction():  # another registry: commits on its own
            audit.get().add(Note(f"run {len(runs)}"))
        raise DisconnectionError("the connection went away after the audit row committed")

    try:
        with pytest.raises(DisconnectionError):
            call(middleware(app, retry=RetryPolicy(attempts=3, backoff=0)))
    finally:
        audit.release()

    assert len(runs) == 1 and audit_db.notes() == ["run 1"]


def test_a_request_whose_transaction_cannot_begin_leaves_no_mode_behind(tmp_path):
    database, _ = other_registry(tmp_path / "a")
    manager = ThreadTransactionManager()
    manager.explicit = True
    registry = StoreRegistry({"main": database.uri}, transaction_manager=manager)
    app = MiddleStorm(note_writer(), registry)
    manager.begin()  # left open by earlier code: an explicit manager refuses another begin()
    try:
        with pytest.raises(AlreadyInTransaction):
            call(app, environ={MODE_KEY: "read-only"})
    finally:
        manager.abort()
        registry.release()

    assert current() is None


def test_work_left_open_before_a_unit_of_work_is_rolled_back_with_a_warning(db, middleware, caplog):
    @no_transaction
    def app(environ, start_response):
        environ["storm.store"].add(Note("outside any unit"))
        environ["storm.store"].flush()
        with current_registry().transaction():
            environ["storm.store"].add(Note("in a unit"))
        start_response("200 OK", [])
        return [b""]

    with caplog.at_level(logging.WARNING, logger="middlestorm"):
        call(middleware(app))

    assert db.notes() == ["in a unit"]
    assert "a unit of work begins while a transaction that stores joined is open" in caplog.text


def test_an_aborted_transaction_says_which_request_and_user_it_was(db, middleware):
    seen = []

    def app(environ, start_response):
        txn = transaction.get()
        txn.addBeforeAbortHook(lambda: seen.append((txn.description, txn.user)))
        environ["storm.store"].add(Note("refused"))
        raise ValueError("the view failed")

    with pytest.raises(ValueError):
        call(middleware(app), "/notes", "POST", environ={USER_KEY: "alice"})

    assert seen == [("POST /notes", "alice")]


def test_a_unit_of_work_in_a_streamed_body_joins_the_requests_transaction(db, middleware):
    def app(environ, start_response):
        store = environ["storm.store"]
        store.add(Note("the request's own"))
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield b"exporting..."
            with current_registry().transaction():  # joins: nothing is aborted
                store.add(Note("the body's unit of work"))
            yield b"done"

        return body()

    assert call(middleware(app)).data == b"exporting...done"

    assert db.notes() == ["the request's own", "the body's unit of work"]
