"""Connections that outlive short threads: a thread's PostgreSQL connection goes to the next."""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import transaction
from werkzeug.serving import make_server

from middlestorm import ConfigurationError, MiddleStorm, StoreRegistry
from middlestorm.handoff import spare_count
from tests.helpers import call, in_forked_child
from tests.models import Note
from tests.test_stores import in_thread, wait_for


def backend_pid(registry: StoreRegistry) -> int:
    """The backend of the calling thread's store, in a transaction committed at once."""
    pid = registry.get().execute("SELECT pg_backend_pid()").get_one()[0]
    transaction.commit()
    return pid


def handed_over(registry: StoreRegistry, count: int = 1) -> bool:
    return wait_for(lambda: spare_count(registry.database()) == count)


@pytest.fixture
def closing():
    """Close the registries given to it (their spare connections too) after the test."""
    made: list[StoreRegistry] = []

    def closing(registry: StoreRegistry) -> StoreRegistry:
        made.append(registry)
        return registry

    yield closing
    for registry in made:
        registry.close()


def test_a_new_thread_takes_the_connection_of_a_thread_that_ended(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))

    first = in_thread(lambda: backend_pid(registry))
    assert handed_over(registry)
    second = in_thread(lambda: backend_pid(registry))

    assert second == first
    assert pg.backends() == 1


def test_no_more_connections_than_spare_connections_are_kept(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}, spare_connections=2))
    barrier = threading.Barrier(5)

    def use_store() -> None:
        barrier.wait(10)  # five connections open at once
        backend_pid(registry)
        barrier.wait(10)

    with ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda _: use_store(), range(5)))

    assert wait_for(lambda: pg.backends() == 2)
    assert spare_count(registry.database()) == 2


def test_spare_connections_are_closed_once_kept_for_spare_timeout(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}, spare_timeout=0.2))

    in_thread(lambda: backend_pid(registry))

    assert wait_for(lambda: pg.backends() == 0)
    assert spare_count(registry.database()) == 0


def test_closing_the_registry_closes_its_spare_connections(pg):
    registry = StoreRegistry({"main": pg.uri})
    in_thread(lambda: backend_pid(registry))
    assert handed_over(registry)

    registry.close()

    assert wait_for(lambda: pg.backends() == 0)


def test_a_spare_connection_the_server_ended_costs_no_request(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))
    middleware = MiddleStorm(lambda environ, start_response: app(environ, start_response), registry)

    def app(environ, start_response):
        environ["storm.store"].add(Note("after the kill"))
        start_response("200 OK", [])
        return [b"saved"]

    stale = in_thread(lambda: backend_pid(registry))
    assert handed_over(registry)
    pg.run(f"SELECT pg_terminate_backend({stale})")

    exchange = in_thread(lambda: call(middleware))

    assert exchange.status == "200 OK"
    assert pg.notes() == ["after the kill"]


def test_a_thread_per_request_server_opens_about_as_many_connections_as_clients(
    request, pg, closing
):
    registry = closing(StoreRegistry({"main": pg.uri}))

    def app(environ, start_response):
        store = environ["storm.store"]
        store.add(Note(environ["PATH_INFO"]))
        pid = store.execute("SELECT pg_backend_pid()").get_one()[0]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(pid).encode()]

    server = make_server("127.0.0.1", 0, MiddleStorm(app, registry), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.server_close)
    request.addfinalizer(server.shutdown)

    def fetch(number: int) -> int:
        url = f"http://127.0.0.1:{server.server_port}/{number}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    with ThreadPoolExecutor(8) as clients:
        backends = list(clients.map(fetch, range(200)))

    assert len(pg.notes()) == 200
    # Each thread hands its connection over as its request ends: the clients'
    # next requests take them, whatever the ending threads still do.
    assert len(set(backends)) <= 8 + 1
    server.shutdown()
    registry.close()
    assert wait_for(lambda: pg.backends() == 0)


def pid_app(environ, start_response):
    pid = environ["storm.store"].execute("SELECT pg_backend_pid()").get_one()[0]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(pid).encode()]


def a_thread_ends_after_one_request(middleware: MiddleStorm) -> None:
    """What tells a registry that its server gives each request a thread of its own."""
    in_thread(lambda: call(middleware))
    assert handed_over(middleware.registry)


def test_a_request_thread_hands_its_connection_over_as_its_request_ends(pg, closing):
    middleware = MiddleStorm(pid_app, closing(StoreRegistry({"main": pg.uri})))
    a_thread_ends_after_one_request(middleware)
    first: list[bytes] = []
    linger = threading.Event()

    def request_then_linger() -> None:  # as a server's thread may, after the response
        first.append(call(middleware).data)
        linger.wait(30)

    lingering = threading.Thread(target=request_then_linger)
    lingering.start()
    try:
        assert wait_for(lambda: first)
        second = in_thread(lambda: call(middleware).data)
        assert lingering.is_alive()
    finally:
        linger.set()
        lingering.join()

    assert second == first[0]
    assert pg.backends() == 1


def test_threads_that_have_not_ended_keep_their_connections(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))

    call(MiddleStorm(pid_app, registry))  # no thread has ended yet: it may be a pool's

    assert spare_count(registry.database()) == 0


def test_a_thread_that_serves_many_requests_keeps_its_connection(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))
    middleware = MiddleStorm(pid_app, registry)
    a_thread_ends_after_one_request(middleware)

    def three_requests() -> list[tuple[bytes, int]]:
        return [(call(middleware).data, spare_count(registry.database())) for _ in range(3)]

    (first, _), (second, after_second), (third, after_third) = in_thread(three_requests)

    assert first == second == third  # the first request's connection, taken back
    assert after_second == after_third == 0  # a pooled thread hands nothing over


def test_sqlite_connections_are_never_handed_over(tmp_path, closing):
    from tests.conftest import make_database

    db = make_database("sqlite", tmp_path)
    registry = closing(StoreRegistry({"main": db.uri}))

    def write(body: str) -> None:
        registry.get().add(Note(body))
        transaction.commit()

    in_thread(lambda: write("first"))
    in_thread(lambda: write("second"))

    assert spare_count(registry.database()) == 0
    assert db.notes() == ["first", "second"]


def test_a_forked_child_never_takes_its_parents_spare_connection(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))
    parents = in_thread(lambda: backend_pid(registry))
    assert handed_over(registry)

    childs = in_forked_child(lambda: backend_pid(registry))

    assert childs != parents
    assert in_thread(lambda: backend_pid(registry)) == parents  # the parent's is intact


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"spare_connections": -1}, "spare_connections must be a whole number >= 0"),
        ({"spare_connections": 1.5}, "spare_connections must be a whole number >= 0"),
        ({"spare_timeout": 0}, "spare_timeout must be a number of seconds > 0"),
        ({"spare_timeout": "30"}, "spare_timeout must be a number of seconds > 0"),
        ({"spare_timeout": float("nan")}, "spare_timeout must be a number of seconds > 0"),
        ({"spare_timeout": True}, "spare_timeout must be a number of seconds > 0"),
    ],
)
def test_bad_spare_settings_are_refused_with_a_message_that_names_them(options, message):
    with pytest.raises(ConfigurationError, match=message):
        StoreRegistry({"main": "sqlite:"}, **options)


def test_a_handed_over_connection_keeps_nothing_of_the_ended_threads_session(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))

    def leave_session_state() -> int:
        store = registry.get()
        store.execute("SELECT pg_advisory_lock(4242)")
        store.execute("SET statement_timeout = 1234")
        return backend_pid(registry)

    first = in_thread(leave_session_state)
    assert handed_over(registry)

    def look() -> tuple[int, str]:
        store = registry.get()
        timeout = store.execute("SHOW statement_timeout").get_one()[0]
        return backend_pid(registry), timeout

    second, timeout = in_thread(look)

    assert second == first
    assert timeout == "0"
    assert pg.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0] == 0


def test_a_thread_that_ended_inside_a_transaction_hands_nothing_over(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))

    def leave_a_transaction_open() -> None:
        registry.get().execute("INSERT INTO note (body) VALUES ('never committed')")

    in_thread(leave_a_transaction_open)

    assert wait_for(lambda: pg.backends() == 0)  # closed, so its locks went at once
    assert spare_count(registry.database()) == 0
    assert pg.notes() == []


def test_a_session_lock_of_an_ended_thread_goes_soon_though_no_thread_takes_its_connection(
    pg, closing
):
    registry = closing(StoreRegistry({"main": pg.uri}))

    def lock_and_end() -> None:
        registry.get().execute("SELECT pg_advisory_lock(4243)")
        transaction.commit()

    in_thread(lock_and_end)

    assert wait_for(lambda: pg.query("SELECT pg_try_advisory_lock(4243)")[0][0])
    assert spare_count(registry.database()) == 1


def test_what_the_server_told_an_ended_thread_is_not_the_next_ones(pg, closing):
    registry = closing(StoreRegistry({"main": pg.uri}))

    def be_told() -> None:
        registry.get().execute("DO $$ BEGIN RAISE NOTICE 'for request 1 only'; END $$")
        transaction.commit()

    in_thread(be_told)
    assert handed_over(registry)

    def notices() -> list[str]:
        store = registry.get()
        store.execute("SELECT 1")
        seen = list(store._connection._raw_connection.notices)
        transaction.commit()
        return seen

    assert in_thread(notices) == []
