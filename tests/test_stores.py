"""StoreRegistry: one store per thread per name, closed with its thread, safe across fork."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import transaction
from storm.exceptions import ClosedError
from storm.store import Store
from storm.zope.interfaces import ZStormError

from middlestorm import ConfigurationError, StoreRegistry, UnknownStoreError, WrongThreadError
from tests.models import Note


def in_thread(function):
    """Run ``function`` in a new thread; return what it returned or raised."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed back to the test
            outcome["value"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    return outcome["value"]


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds pass; the server updates lazily."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_thread_gets_the_same_store_each_time(registry):
    assert registry.get() is registry.get("main")


def test_each_thread_gets_its_own_store(registry):
    barrier = threading.Barrier(4)

    def use_store():
        barrier.wait(10)  # four threads at once, so none is reused by the pool
        first = registry.get()
        first.find(Note).count()
        transaction.commit()
        return threading.get_ident(), first, registry.get()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: use_store(), range(4)))

    assert len({ident for ident, _, _ in results}) == 4
    assert len({id(store) for _, store, _ in results}) == 4
    assert all(first is again for _, first, again in results)
    assert all(store is not registry.get() for _, store, _ in results)


def test_a_store_is_created_on_first_use_only(pg):
    registry = StoreRegistry({"main": pg.uri})
    try:
        assert pg.backends() == 0
        registry.get()
        assert pg.backends() == 1
    finally:
        registry.release()


def test_a_stores_connection_is_closed_when_its_thread_ends_without_spares(pg):
    registry = StoreRegistry({"main": pg.uri}, spare_connections=0)

    def use_store():
        registry.get().find(Note).count()
        transaction.commit()
        return pg.backends()

    assert in_thread(use_store) == 1
    assert wait_for(lambda: pg.backends() == 0)


def test_many_short_lived_threads_leave_no_connections_behind_once_closed(pg):
    registry = StoreRegistry({"main": pg.uri})

    def request(number):
        store = registry.get()
        store.add(Note(f"note {number}"))
        transaction.commit()

    threads = [threading.Thread(target=request, args=(n,)) for n in range(60)]
    for batch in range(0, len(threads), 10):  # ten at a time, as a busy dev server would
        for thread in threads[batch : batch + 10]:
            thread.start()
        for thread in threads[batch : batch + 10]:
            thread.join(30)

    assert len(pg.notes()) == 60
    assert pg.backends() <= registry.spare_connections
    registry.close()
    assert wait_for(lambda: pg.backends() == 0)


def test_a_closed_threads_store_cannot_be_used_again(registry):
    store = in_thread(lambda: registry.get())

    with pytest.raises(ClosedError):
        store._connection.execute("SELECT 1")


def test_release_closes_this_threads_stores_and_get_opens_new_ones(registry):
    first = registry.get()
    registry.release()

    second = registry.get()

    assert second is not first
    with pytest.raises(ClosedError):
        first._connection.execute("SELECT 1")


def test_a_store_used_from_another_thread_mid_transaction_raises(registry):
    store = registry.get()
    store.find(Note).count()  # joins this thread's transaction

    error = in_thread(lambda: store.find(Note).count())

    assert isinstance(error, WrongThreadError)
    assert "belongs to thread" in str(error) and "'main'" in str(error)


def test_a_store_used_from_another_thread_between_transactions_raises(registry):
    store = registry.get()

    error = in_thread(lambda: store.find(Note).count())

    assert isinstance(error, ZStormError)
    assert "thread" in str(error)


def test_an_unknown_store_name_names_the_known_ones(db):
    registry = StoreRegistry({"main": db.uri, "reports": db.uri})

    with pytest.raises(UnknownStoreError, match="no store named 'report'.*'main', 'reports'"):
        registry.get("report")


def test_the_default_store_is_the_first_unless_named(db):
    assert StoreRegistry({"a": db.uri, "b": db.uri}).default_name == "a"
    assert StoreRegistry({"a": db.uri, "b": db.uri}, default="b").names == ["b", "a"]


def test_a_default_that_is_not_configured_is_refused(db):
    with pytest.raises(UnknownStoreError, match="'nope'"):
        StoreRegistry({"main": db.uri}, default="nope")


def test_two_registries_never_share_stores(db):
    first, second = StoreRegistry({"main": db.uri}), StoreRegistry({"main": db.uri})
    try:
        assert first.get() is not second.get()
    finally:
        first.release()
        second.release()


def test_a_registry_has_its_own_transaction_manager_when_given_one(db):
    manager = transaction.ThreadTransactionManager()
    registry = StoreRegistry({"main": db.uri}, transaction_manager=manager)
    try:
        manager.begin()
        registry.get().add(Note("own manager"))
        transaction.manager.abort()  # the global manager knows nothing of it
        manager.commit()
    finally:
        registry.release()

    assert db.notes() == ["own manager"]


def test_a_transaction_manager_shared_by_all_threads_is_refused_and_the_fix_named(db):
    with pytest.raises(ConfigurationError, match="thread") as refused:
        StoreRegistry({"main": db.uri}, transaction_manager=transaction.TransactionManager())

    assert "transaction.ThreadTransactionManager()" in str(refused.value)
    assert "transaction.manager" in str(refused.value)


def test_an_explicit_thread_local_transaction_manager_is_accepted(db):
    manager = transaction.ThreadTransactionManager()
    manager.explicit = True
    registry = StoreRegistry({"main": db.uri}, transaction_manager=manager)
    try:
        with manager:
            registry.get().add(Note("explicit"))
    finally:
        registry.release()

    assert db.notes() == ["explicit"]


def test_threads_sharing_a_registry_with_its_own_manager_keep_exactly_their_commits(db):
    """Eight threads are mid-transaction at once; every third transaction aborts."""
    manager = transaction.ThreadTransactionManager()
    registry = StoreRegistry({"main": db.uri}, transaction_manager=manager)
    threads, rounds = 8, 6
    all_in_a_transaction = threading.Barrier(threads)

    def work(number: int) -> tuple[set[str], set[str]]:
        committed, aborted = set(), set()
        try:
            for index in range(rounds):
                body = f"thread {number} note {index}"
                manager.begin()
                registry.get().add(Note(body))
                all_in_a_transaction.wait(30)
                if index % 3 == 2:
                    manager.abort()
                    aborted.add(body)
                else:
                    manager.commit()
                    committed.add(body)
        finally:
            registry.release()
        return committed, aborted

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(work, range(threads)))

    committed = set().union(*(done for done, _ in outcomes))
    aborted = set().union(*(undone for _, undone in outcomes))
    assert len(committed) == threads * 4 and len(aborted) == threads * 2
    assert sorted(db.notes()) == sorted(committed)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(pg):
    registry = StoreRegistry({"main": pg.uri})
    store = registry.get()
    parent_backend = store.execute("SELECT pg_backend_pid()").get_one()[0]
    transaction.commit()
    read_end, write_end = os.pipe()

    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            child_store = registry.get()
            backend = child_store.execute("SELECT pg_backend_pid()").get_one()[0]
            transaction.commit()
            same = child_store is store
            os.write(write_end, f"{backend} {same}".encode())
        finally:
            os._exit(0)

    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_backend, same_store = pipe.read().split()
    os.waitpid(child, 0)

    assert same_store == "False"
    assert int(child_backend) != parent_backend
    # The parent's session survived the child: same backend, still answering.
    assert registry.get().execute("SELECT pg_backend_pid()").get_one()[0] == parent_backend
    transaction.commit()
    registry.release()


def test_the_registry_repr_hides_passwords():
    registry = StoreRegistry({"main": "postgres://app:hunter2@db.example/app"})

    assert "hunter2" not in repr(registry)
    assert "postgres://app:***@db.example/app" in repr(registry)


def test_a_registry_can_be_a_store_name_map_for_storm_users(registry):
    assert isinstance(registry.get(), Store)
    assert registry.get_name(registry.get()) == "main"


def test_a_registry_hands_out_the_database_behind_a_store_name(db):
    from storm.database import create_database

    reports = create_database(db.uri)
    registry = StoreRegistry({"main": db.uri, "reports": reports})

    assert registry.database("reports") is reports
    assert registry.database() is registry.get().get_database()
    with pytest.raises(UnknownStoreError, match="'nope'"):
        registry.database("nope")
    registry.release()
