"""MiddleStorm: one transaction per request, ended at the right moment (PEP 3333)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import transaction
from storm.database import create_database
from storm.exceptions import DisconnectionError, IntegrityError
from storm.store import Store
from werkzeug.wrappers import Request, Response

from middlestorm import (
    ConfigurationError,
    MiddleStorm,
    StoreRegistry,
    current_store,
    decorator,
    get_store,
    make_middleware,
)
from middlestorm.lifecycle import under_way
from tests.conftest import make_database
from tests.helpers import DataManager, call, start, streaming
from tests.models import Note, Tag


@pytest.fixture
def released():
    """Close this thread's stores of the middlewares given to it, after the test."""
    made: list[MiddleStorm] = []

    def released(middleware: MiddleStorm) -> MiddleStorm:
        made.append(middleware)
        return middleware

    yield released
    for middleware in made:
        middleware.registry.release()


@pytest.fixture
def wrap(request, released):
    """Wrap an app in MiddleStorm on the test database."""
    db = request.getfixturevalue("pg" if "pg" in request.fixturenames else "db")
    return lambda app, **options: released(MiddleStorm(app, db.uri, **options))


def adding(body: str = "hello", status: str = "200 OK", headers=()):
    """An app that adds a note and answers with a list body."""

    def app(environ, start_response):
        environ["storm.store"].add(Note(body))
        start_response(status, [("Content-Type", "text/plain"), *headers])
        return [b"ok"]

    return app


# -- commit and abort ---------------------------------------------------------


def test_a_successful_request_is_committed(db, wrap):
    response = call(wrap(adding("kept")))

    assert response.status == "200 OK"
    assert db.notes() == ["kept"]


def test_an_exception_in_the_app_aborts(db, wrap):
    def app(environ, start_response):
        environ["storm.store"].add(Note("lost"))
        environ["storm.store"].flush()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        call(wrap(app))
    assert db.notes() == []


@pytest.mark.parametrize(
    "status", ["400 Bad Request", "404 Not Found", "500 Internal Server Error"]
)
def test_an_error_status_aborts(db, wrap, status):
    response = call(wrap(adding("lost", status)))

    assert response.status == status
    assert db.notes() == []


@pytest.mark.parametrize("status", ["200 OK", "201 Created", "204 No Content", "303 See Other"])
def test_a_success_or_redirect_status_commits(db, wrap, status):
    call(wrap(adding("kept", status)))

    assert db.notes() == ["kept"]


def test_an_x_tm_commit_header_commits_an_error_response(db, wrap):
    call(wrap(adding("audit trail", "403 Forbidden", [("X-Tm", "commit")])))

    assert db.notes() == ["audit trail"]


def test_an_x_tm_abort_header_aborts_a_success_response(db, wrap):
    call(wrap(adding("dry run", "200 OK", [("X-Tm", "abort")])))

    assert db.notes() == []


def test_a_custom_commit_veto_decides(db, wrap):
    def veto(environ, status, headers):
        return environ["PATH_INFO"] == "/preview"

    app = wrap(adding("x"), commit_veto=veto)
    call(app, "/preview")
    call(app, "/save")

    assert db.notes() == ["x"]


def test_no_commit_veto_commits_error_responses_too(db, wrap):
    call(wrap(adding("kept", "500 Internal Server Error"), commit_veto=None))

    assert db.notes() == ["kept"]


def test_a_commit_veto_that_raises_aborts_and_the_error_propagates(db, wrap):
    def veto(environ, status, headers):
        raise KeyError("broken veto")

    middleware = wrap(adding("lost"), commit_veto=veto)
    with pytest.raises(KeyError, match="broken veto"):
        call(middleware)

    assert db.notes() == []


def test_an_injected_transaction_manager_is_the_one_used(db, wrap):
    manager = transaction.ThreadTransactionManager()
    seen = []

    def app(environ, start_response):
        environ["storm.store"].add(Note("own manager"))
        seen.append(manager.get() is not transaction.manager.get())
        start_response("200 OK", [])
        return [b""]

    call(wrap(app, transaction_manager=manager))

    assert seen == [True]
    assert db.notes() == ["own manager"]


def test_a_doomed_transaction_is_aborted(db, wrap):
    def app(environ, start_response):
        environ["storm.store"].add(Note("doomed"))
        transaction.doom()
        start_response("200 OK", [])
        return [b""]

    assert call(wrap(app)).status == "200 OK"
    assert db.notes() == []


def test_an_app_that_commits_itself_keeps_its_commits(db, wrap):
    def app(environ, start_response):
        store = environ["storm.store"]
        store.add(Note("committed by the app"))
        store.commit()
        store.add(Note("not committed"))
        start_response("500 Internal Server Error", [])
        return [b"failed later"]

    call(wrap(app))

    assert db.notes() == ["committed by the app"]


# -- the moment the transaction ends --------------------------------------------


def test_a_list_body_is_committed_before_the_status_reaches_the_server(db, wrap):
    response = call(wrap(adding("early")), on_status=db.notes)

    assert response.seen_at_status == ["early"]


def test_a_werkzeug_response_is_committed_before_the_status_reaches_the_server(db, wrap):
    @Request.application
    def app(request):
        current_store.add(Note(request.args["body"]))
        return Response("saved")

    response = call(wrap(app), "/?body=werkzeug", on_status=db.notes)

    assert response.data == b"saved"
    assert response.seen_at_status == ["werkzeug"]


@pytest.mark.parametrize(("method", "status"), [("DELETE", 204), ("GET", 304), ("HEAD", 200)])
def test_a_response_without_a_body_is_committed_before_the_status(db, wrap, method, status):
    @Request.application
    def app(request):
        current_store.add(Note(request.method))
        return Response("ignored", status) if request.method == "HEAD" else Response(status=status)

    response = call(wrap(app), method=method, on_status=db.notes)

    assert response.seen_at_status == [method]


def test_a_failing_commit_becomes_an_error_and_no_status_is_sent(db, wrap):
    def app(environ, start_response):
        environ["storm.store"].add(Note("with a bad tag"))
        environ["storm.store"].add(Tag(note_id=999_999))
        start_response("200 OK", [])
        return [b"ok"]

    with pytest.raises(IntegrityError):
        call(wrap(app))

    assert db.notes() == []


def test_the_next_request_after_a_failed_commit_starts_clean(db, wrap):
    def app(environ, start_response):
        store = environ["storm.store"]
        store.add(Note(environ["PATH_INFO"]))
        if environ["PATH_INFO"] == "/bad":
            store.add(Tag(note_id=999_999))
        start_response("200 OK", [])
        return [b"ok"]

    middleware = wrap(app)
    with pytest.raises(IntegrityError):
        call(middleware, "/bad")
    call(middleware, "/good")

    assert db.notes() == ["/good"]


def test_the_next_request_after_an_abort_starts_with_a_clean_store(db, wrap):
    def app(environ, start_response):
        store = environ["storm.store"]
        pending = store.find(Note).count()
        store.add(Note(environ["PATH_INFO"]))
        start_response("400 Bad Request" if environ["PATH_INFO"] == "/bad" else "200 OK", [])
        return [str(pending).encode()]

    middleware = wrap(app)
    call(middleware, "/bad")
    response = call(middleware, "/good")

    assert response.data == b"0"
    assert db.notes() == ["/good"]


def test_a_streamed_body_is_produced_inside_the_transaction(db, wrap):
    _, body = start(wrap(streaming("one", "two", "three")))
    iterator = iter(body)
    assert next(iterator) == b"one"
    assert next(iterator) == b"two"
    assert db.notes() == []  # still open while the body is produced

    assert list(iterator) == [b"three"]
    body.close()

    assert db.notes() == ["one", "two", "three"]


def test_a_client_disconnect_during_a_streamed_body_aborts(db, wrap):
    _, body = start(wrap(streaming("one", "two", "three")))
    assert next(iter(body)) == b"one"

    body.close()  # what a server does when the client goes away

    assert db.notes() == []


def test_an_error_while_streaming_aborts(db, wrap):
    def app(environ, start_response):
        start_response("200 OK", [])

        def body():
            environ["storm.store"].add(Note("half"))
            yield b"half"
            raise RuntimeError("broken stream")

        return body()

    with pytest.raises(RuntimeError, match="broken stream"):
        call(wrap(app))
    assert db.notes() == []


def test_a_commit_failing_after_a_streamed_status_is_logged_and_raised(db, wrap, caplog):
    def app(environ, start_response):
        start_response("200 OK", [])

        def body():
            environ["storm.store"].add(Tag(note_id=999_999))
            yield b"looks fine"

        return body()

    with pytest.raises(IntegrityError):
        call(wrap(app))

    assert "commit failed while the response (200 OK) was being sent" in caplog.text
    assert "cut short" in caplog.text
    assert db.query("SELECT count(*) FROM tag") == [(0,)]


def test_closing_a_streamed_body_twice_ends_the_transaction_once(db, wrap):
    _, body = start(wrap(streaming("once")))
    assert list(body) == [b"once"]
    body.close()
    transaction.begin()
    other = transaction.get()

    body.close()

    assert transaction.get() is other and not other.isDoomed()
    assert db.notes() == ["once"]


def test_a_streamed_body_sends_its_status_before_the_commit(db, wrap):
    response = call(wrap(streaming("late")), on_status=db.notes)

    assert response.seen_at_status == []
    assert db.notes() == ["late"]


def test_a_sized_body_over_the_buffer_limit_is_streamed(db, wrap):
    app = wrap(streaming("big", headers=[("Content-Length", "3")]), buffer_limit=2)

    response = call(app, on_status=db.notes)

    assert response.seen_at_status == []
    assert response.data == b"big"
    assert db.notes() == ["big"]


def test_a_sized_generator_body_within_the_buffer_limit_is_committed_first(db, wrap):
    app = wrap(streaming("small", headers=[("Content-Length", "5")]))

    response = call(app, on_status=db.notes)

    assert response.seen_at_status == ["small"]
    assert response.data == b"small"


def test_the_write_callable_sends_data_and_the_request_commits(db, wrap):
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        environ["storm.store"].add(Note("written"))
        write(b"first, ")
        return [b"then the rest"]

    response = call(wrap(app))

    assert response.data == b"first, then the rest"
    assert db.notes() == ["written"]


def test_a_generator_app_that_starts_the_response_late_is_committed(db, wrap):
    def app(environ, start_response):
        environ["storm.store"].add(Note("late start"))
        start_response("200 OK", [])
        yield b"body"

    response = call(wrap(app))

    assert (response.status, response.data) == ("200 OK", b"body")
    assert db.notes() == ["late start"]


def test_an_error_page_started_with_exc_info_is_sent_and_aborts(db, wrap):
    def app(environ, start_response):
        environ["storm.store"].add(Note("lost"))
        start_response("200 OK", [])
        try:
            raise ValueError("bad form")
        except ValueError:
            import sys

            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"sorry"]

    response = call(wrap(app))

    assert response.status == "500 Internal Server Error"
    assert db.notes() == []


# -- lazy and frugal ------------------------------------------------------------


def test_a_request_that_never_uses_a_store_opens_no_connection(pg, wrap):
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"static"]

    call(wrap(app))

    assert pg.backends() == 0


class Recorder(DataManager):
    """A data manager that records how its transaction ended."""

    def __init__(self) -> None:
        self.transaction_manager = transaction.manager
        self.calls: list[str] = []

    def abort(self, txn) -> None:
        self.calls.append("abort")

    def tpc_finish(self, txn) -> None:
        self.calls.append("commit")


class NewTransactions:
    """A synchronizer that counts the transactions begun."""

    def __init__(self) -> None:
        self.begun = 0

    def newTransaction(self, txn) -> None:
        self.begun += 1

    def beforeCompletion(self, txn) -> None:
        pass

    def afterCompletion(self, txn) -> None:
        pass


def test_a_request_that_never_uses_a_store_begins_no_transaction(db, wrap):
    seen = []

    def app(environ, start_response):
        seen.append(under_way(transaction.manager))
        start_response("200 OK", [])
        return [b"static"]

    call(wrap(app))

    assert seen == [False]
    assert not under_way(transaction.manager)


def test_a_data_manager_the_app_joins_without_a_store_is_committed(db, wrap):
    recorder = Recorder()

    def app(environ, start_response):
        transaction.get().join(recorder)
        start_response("200 OK", [])
        return [b""]

    call(wrap(app))

    assert recorder.calls == ["commit"]


def test_a_transaction_the_app_dooms_without_a_store_is_aborted(db, wrap):
    recorder = Recorder()

    def app(environ, start_response):
        transaction.get().join(recorder)
        transaction.doom()
        start_response("200 OK", [])
        return [b""]

    call(wrap(app))

    assert recorder.calls == ["abort"]


def test_a_transaction_left_open_before_the_request_is_aborted_not_joined(db, wrap):
    leftover = Recorder()
    transaction.get().join(leftover)  # earlier code on this thread never ended it

    def app(environ, start_response):
        environ["storm.store"].add(Note("own transaction"))
        start_response("200 OK", [])
        return [b""]

    call(wrap(app))

    assert leftover.calls == ["abort"]
    assert db.notes() == ["own transaction"]


def test_a_registered_synchronizer_hears_of_a_transaction_for_every_request(db, wrap):
    synchronizer = NewTransactions()
    transaction.manager.registerSynch(synchronizer)
    try:

        def app(environ, start_response):
            start_response("200 OK", [])
            return [b""]

        for _ in range(3):
            call(wrap(app))
    finally:
        transaction.manager.unregisterSynch(synchronizer)

    assert synchronizer.begun == 3


def test_a_request_sends_what_hand_written_storm_code_sends(db, wrap, tracer):
    store = Store(create_database(db.uri))
    store.add(Note("warm-up"))
    store.commit()
    tracer.clear()
    store.add(Note("by hand"))
    store.commit()
    by_hand = tracer.seen()
    store.close()
    middleware = wrap(adding("by middleware"))
    call(middleware)  # the first request also opens the connection
    tracer.clear()

    call(middleware)

    assert tracer.seen() == by_hand
    assert by_hand[0][0] == "INSERT" and by_hand[1:] == (1, 0)


def test_an_aborted_request_sends_at_most_a_rollback(db, wrap, tracer):
    middleware = wrap(adding("lost", "400 Bad Request"))
    call(middleware)
    tracer.clear()

    call(middleware)

    statements, commits, rollbacks = tracer.seen()
    assert (statements, commits) == ([], 0)
    assert rollbacks <= 1


def test_a_request_that_only_reads_sends_no_extra_statement(db, wrap, tracer):
    def app(environ, start_response):
        count = environ["storm.store"].find(Note).count()
        start_response("200 OK", [])
        return [str(count).encode()]

    middleware = wrap(app)
    call(middleware)
    tracer.clear()

    call(middleware)

    assert tracer.statements == ["SELECT"]
    assert tracer.commits <= 1 and tracer.rollbacks == 0


# -- reaching the stores ----------------------------------------------------------


def test_environ_holds_this_threads_store_under_the_configured_key(db, wrap):
    seen = {}

    def app(environ, start_response):
        seen["store"] = environ["sql"]
        seen["current"] = current_store._get_current_object()
        start_response("200 OK", [])
        return [b""]

    call(wrap(app, key="sql"))

    assert isinstance(seen["store"], Store)
    assert seen["store"]._get_current_object() is seen["current"]


def test_named_stores_are_reachable_and_commit_together(db, tmp_path, released):
    reports = make_database("sqlite", tmp_path / "reports")

    def app(environ, start_response):
        environ["storm.store"].add(Note("main"))
        environ["middlestorm.stores"].get("reports").add(Note("report"))
        get_store("reports").add(Note("report 2"))
        start_response("200 OK" if environ["PATH_INFO"] == "/ok" else "409 Conflict", [])
        return [b""]

    middleware = released(MiddleStorm(app, db.uri, stores={"reports": reports.uri}))

    call(middleware, "/conflict")
    assert (db.notes(), reports.notes()) == ([], [])
    call(middleware, "/ok")
    assert (db.notes(), reports.notes()) == (["main"], ["report", "report 2"])


def test_two_middlewares_in_one_process_keep_their_own_stores(db, wrap):
    stores = []

    def app(environ, start_response):
        stores.append(environ["storm.store"]._get_current_object())
        start_response("200 OK", [])
        return [b""]

    first, second = wrap(app), wrap(app)
    call(first), call(second), call(first)

    assert stores[0] is stores[2]
    assert stores[0] is not stores[1]
    assert first.registry is not second.registry


def test_a_nested_middleware_joins_the_outer_requests_transaction(db, tmp_path, released):
    reports = make_database("sqlite", tmp_path / "reports")
    inner = released(
        MiddleStorm(adding("inner", "404 Not Found"), reports.uri, key="reports.store")
    )

    def outer_app(environ, start_response):
        environ["storm.store"].add(Note("outer"))
        return inner(environ, start_response)

    call(released(MiddleStorm(outer_app, db.uri)))

    assert (db.notes(), reports.notes()) == ([], [])  # one veto for both


def subrequest(app, environ) -> bytes:
    """Call ``app`` from inside another app's request, as a page that embeds another would."""
    result = app(environ, lambda status, headers, exc_info=None: None)
    try:
        return b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()


def adding_through_current_store(body: str):
    def app(environ, start_response):
        current_store.add(Note(body))
        start_response("200 OK", [])
        return [b""]

    return app


def test_an_app_mounted_under_a_dispatcher_writes_to_its_own_database(db, tmp_path, released):
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    reports = make_database("sqlite", tmp_path / "reports")
    mounted = released(MiddleStorm(adding_through_current_store("report"), reports.uri))
    dispatcher = DispatcherMiddleware(adding_through_current_store("main"), {"/reports": mounted})
    app = released(MiddleStorm(dispatcher, db.uri))

    call(app, "/reports/monthly")
    call(app, "/")

    assert (db.notes(), reports.notes()) == (["main"], ["report"])


def test_the_outer_stores_are_current_again_after_an_inner_middleware_returns(
    db, tmp_path, released
):
    reports = make_database("sqlite", tmp_path / "reports")
    inner = released(MiddleStorm(adding_through_current_store("inner"), reports.uri))

    def outer_app(environ, start_response):
        subrequest(inner, environ)
        current_store.add(Note("outer, current_store"))
        environ["storm.store"].add(Note("outer, environ"))
        start_response("200 OK", [])
        return [b""]

    call(released(MiddleStorm(outer_app, db.uri)))

    assert reports.notes() == ["inner"]
    assert db.notes() == ["outer, current_store", "outer, environ"]


def test_an_inner_middlewares_streamed_body_uses_the_inner_stores(db, tmp_path, released):
    reports = make_database("sqlite", tmp_path / "reports")

    def streamed_report(environ, start_response):
        start_response("200 OK", [])

        def body():
            current_store.add(Note("streamed report"))
            yield b"report"

        return body()

    inner = released(MiddleStorm(streamed_report, reports.uri))

    call(released(MiddleStorm(inner, db.uri)))

    assert (db.notes(), reports.notes()) == ([], ["streamed report"])


def test_a_middleware_on_the_outer_manager_inside_one_on_another_joins_the_outer_transaction(
    db, tmp_path, released
):
    audit = make_database("sqlite", tmp_path / "audit")
    reports = make_database("sqlite", tmp_path / "reports")
    own_manager = transaction.ThreadTransactionManager()
    inner = released(
        MiddleStorm(
            adding_through_current_store("audit"), audit.uri, transaction_manager=own_manager
        )
    )
    third = released(MiddleStorm(adding_through_current_store("report"), reports.uri))
    seen = []

    def outer_app(environ, start_response):
        environ["storm.store"].add(Note("outer"))
        subrequest(inner, environ)
        seen.append(environ["middlestorm.transaction_manager"] is transaction.manager)
        subrequest(third, environ)  # on the outer manager again: joins, begins nothing
        start_response("200 OK", [])
        return [b""]

    response = call(released(MiddleStorm(outer_app, db.uri)))

    assert response.status == "200 OK" and seen == [True]
    assert (db.notes(), audit.notes(), reports.notes()) == (["outer"], ["audit"], ["report"])


# -- bounded memory, and the server's fast path --------------------------------------------


class Chunk(bytes):
    """A body chunk that counts itself: how many are alive at once."""

    alive = 0

    def __new__(cls, data: bytes) -> Chunk:
        Chunk.alive += 1
        return super().__new__(cls, data)

    def __del__(self) -> None:
        Chunk.alive -= 1


def test_a_head_response_never_holds_more_than_the_buffer_limit(db, wrap):
    alive_at_most = []

    def app(environ, start_response):
        environ["storm.store"].add(Note("head"))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            for _ in range(100):
                alive_at_most.append(Chunk.alive)
                yield Chunk(b"x" * 1024)

        return body()

    response = call(wrap(app, buffer_limit=4 * 1024), method="HEAD", on_status=db.notes)

    assert max(alive_at_most) <= 4  # never more than the buffer limit's worth
    assert response.seen_at_status == ["head"]  # still committed before the status
    assert response.data == b""


def test_a_body_longer_than_its_content_length_is_held_only_up_to_it(db, wrap):
    alive_at_most = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "10")])

        def body():
            for _ in range(100):
                alive_at_most.append(Chunk.alive)
                yield Chunk(b"x" * 1024)

        return body()

    response = call(wrap(app))

    assert response.data == b"x" * 10
    assert max(alive_at_most) <= 2


def test_a_negative_content_length_counts_as_none(db, wrap):
    response = call(
        wrap(streaming("streamed", headers=[("Content-Length", "-1")])), on_status=db.notes
    )

    assert response.seen_at_status == []  # streamed: the status went before the commit
    assert db.notes() == ["streamed"]


def test_the_servers_file_wrapper_reaches_the_server_as_that_object(db, wrap, tmp_path):
    from gunicorn.http.wsgi import FileWrapper

    path = tmp_path / "download.bin"
    path.write_bytes(b"y" * 4096)
    returned = []

    def app(environ, start_response):
        environ["storm.store"].add(Note("downloaded"))
        start_response("200 OK", [("Content-Length", "4096")])
        returned.append(environ["wsgi.file_wrapper"](path.open("rb")))
        return returned[-1]

    exchange, body = start(
        wrap(app, buffer_limit=1024), environ={"wsgi.file_wrapper": FileWrapper}, on_status=db.notes
    )
    try:
        assert body is returned[0]
        assert exchange.seen_at_status == ["downloaded"]  # committed before the status
        assert b"".join(body) == b"y" * 4096
    finally:
        body.close()


# -- the drop-in API of middlestorm 0.8.1 -------------------------------------------


def test_middlestorm_takes_a_storm_database_positionally(db, released):
    call(released(MiddleStorm(adding("compat"), create_database(db.uri), "storm.store")))

    assert db.notes() == ["compat"]


def test_the_decorator_wraps_an_app(db, released):
    @decorator(db.uri, key="my.store")
    def app(environ, start_response):
        environ["my.store"].add(Note("decorated"))
        start_response("200 OK", [])
        return [b""]

    call(released(app))

    assert db.notes() == ["decorated"]


def test_the_decorator_keeps_the_apps_name_doc_and_wrapped(db, released):
    def notes_app(environ, start_response):
        """Serve the notes."""
        start_response("200 OK", [])
        return [b""]

    app = released(decorator(db.uri)(notes_app))

    assert (app.__name__, app.__doc__, app.__wrapped__) == (
        "notes_app",
        "Serve the notes.",
        notes_app,
    )
    assert isinstance(app, MiddleStorm)


def test_the_paste_filter_factory_is_registered_and_takes_db_uri(db, released):
    from importlib.metadata import entry_points

    (entry_point,) = entry_points(group="paste.filter_app_factory", name="middlestorm")
    assert entry_point.load() is make_middleware

    call(released(make_middleware(adding("pasted"), {}, db_uri=db.uri, key="storm.store")))
    assert db.notes() == ["pasted"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"app": "not an app"}, "app must be a WSGI application"),
        ({"commit_veto": True}, "commit_veto must be a callable"),
        ({"buffer_limit": -1}, "buffer_limit must be a whole number"),
        ({"stores": {"main": "sqlite:"}}, "'main' names the default store"),
        ({"key": "middlestorm.stores"}, "key and stores_key are both 'middlestorm.stores'"),
        ({"key": "middlestorm.transaction_manager"}, "key='middlestorm.transaction_manager'"),
        ({"stores_key": "middlestorm.transaction_manager"}, "stores_key='middlestorm.trans"),
        ({"key": "wsgi.input"}, "key='wsgi.input' is an environ key that WSGI"),
        ({"key": ""}, "key must be a non-empty string"),
        ({"stores_key": None}, "stores_key must be a non-empty string"),
    ],
)
def test_bad_arguments_are_refused_with_a_message_that_names_them(arguments, message):
    arguments = {"app": adding(), "database": "sqlite:", **arguments}

    with pytest.raises((TypeError, ConfigurationError), match=message):
        MiddleStorm(**arguments)


def test_a_registry_given_to_the_middleware_brings_its_own_stores(db):
    registry = StoreRegistry({"main": db.uri})

    with pytest.raises(ConfigurationError, match="pass stores and transaction_manager"):
        MiddleStorm(adding(), registry, stores={"other": db.uri})


def test_the_paste_filter_takes_db_uri_from_the_default_section(db, released):
    call(released(make_middleware(adding("from defaults"), {"db_uri": db.uri})))
    assert db.notes() == ["from defaults"]


def test_the_paste_filter_without_db_uri_says_what_to_add():
    with pytest.raises(ConfigurationError, match="add 'db_uri = <URI>'"):
        make_middleware(adding(), {})


# -- when the database goes away --------------------------------------------------------


def test_a_request_that_finds_its_connection_dropped_reconnects_and_succeeds(pg, wrap):
    middleware = wrap(adding("before"))
    call(middleware)
    pg.run(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE application_name = '{pg.name}'"
    )

    response = call(middleware)  # finds the connection dead, and is run again

    assert response.status == "200 OK"
    assert pg.notes() == ["before", "before"]


def test_without_retries_a_dropped_connection_fails_one_request_only(pg, wrap):
    middleware = wrap(adding("before"), retry=None)
    call(middleware)
    pg.run(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE application_name = '{pg.name}'"
    )

    with pytest.raises(DisconnectionError):
        call(middleware)  # the one request that finds the connection dead
    call(middleware)

    assert pg.notes() == ["before", "before"]


# -- under a real thread-per-request server ----------------------------------------------


def test_a_client_that_hangs_up_mid_stream_on_a_real_server_leaves_nothing_saved(request, db):
    import socket
    import threading

    from werkzeug.serving import make_server

    stream_ended = threading.Event()

    def app(environ, start_response):
        environ["storm.store"].add(Note("never finished"))
        environ["storm.store"].flush()
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            try:
                for _ in range(2000):  # 128 MiB at most; the hang-up stops it long before
                    yield b"x" * 65536
            finally:
                stream_ended.set()

        return body()

    server = make_server("127.0.0.1", 0, MiddleStorm(app, db.uri), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.server_close)
    request.addfinalizer(server.shutdown)

    with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
    assert stream_ended.wait(30)

    assert db.notes() == []


def test_a_thread_per_request_server_commits_everything_and_leaves_no_connections(request, db):
    import json
    import threading
    import urllib.request

    from werkzeug.serving import make_server

    from tests.test_stores import wait_for

    def app(environ, start_response):
        store = environ["storm.store"]
        store.add(Note(environ["PATH_INFO"]))
        body = json.dumps({"thread": threading.get_ident()}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    middleware = MiddleStorm(app, db.uri)
    server = make_server("127.0.0.1", 0, middleware, threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    request.addfinalizer(server.server_close)
    request.addfinalizer(server.shutdown)
    base = f"http://127.0.0.1:{server.server_port}"

    def fetch(number: int) -> int:
        with urllib.request.urlopen(f"{base}/{number}", timeout=30) as response:
            return json.load(response)["thread"]

    with ThreadPoolExecutor(8) as clients:
        threads = list(clients.map(fetch, range(40)))

    assert sorted(db.notes()) == sorted(f"/{n}" for n in range(40))
    assert threading.get_ident() not in threads
    server.shutdown()
    middleware.registry.close()
    if db.kind == "postgres":
        assert wait_for(lambda: db.backends() == 0)
