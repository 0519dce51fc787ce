"""A unit of work outside WSGI: run, retry transient failures, commit; and what a failure keeps."""

from __future__ import annotations

import logging

import pytest
import transaction
from storm.exceptions import IntegrityError
from transaction.interfaces import TransientError

from middlestorm import (
    CommitInDoubtError,
    RetryPolicy,
    StoreRegistry,
    run_in_transaction,
)
from tests.models import Counter, Note, Tag

FAST = RetryPolicy(attempts=3, backoff=0.001)


def conflicting_increment(registry, db, runs: list[int]):
    """Increment counter 1; on the first run another client increments it meanwhile."""

    def work() -> int:
        runs.append(len(runs) + 1)
        counter = registry.get().get(Counter, 1)
        if len(runs) == 1:
            if db.kind == "postgres":
                db.run("UPDATE counter SET value = value + 1 WHERE id = 1")
            else:  # SQLite serializes writers: no conflict to meet, so make one
                raise TransientError("a conflict")
        counter.value += 1
        registry.get().flush()
        return counter.value

    return work


def backend_pid(registry) -> int:
    pid = registry.get().execute("SELECT pg_backend_pid()").get_one()[0]
    transaction.commit()
    return pid


def test_a_transient_failure_runs_the_work_again_and_commits_once(registry, db):
    runs: list[int] = []

    result = run_in_transaction(registry, conflicting_increment(registry, db, runs), policy=FAST)

    assert runs == [1, 2]
    assert db.counters()[0] == result == (2 if db.kind == "postgres" else 1)


def test_the_last_transient_failure_is_raised_when_attempts_run_out(registry, db):
    runs: list[int] = []

    def always_conflicting() -> None:
        runs.append(1)
        registry.get().add(Note("never saved"))
        raise TransientError("a conflict, every time")

    with pytest.raises(TransientError, match="every time"):
        run_in_transaction(registry, always_conflicting, policy=FAST)

    assert len(runs) == 3
    assert db.notes() == []


def test_a_permanent_failure_is_raised_at_once(registry, db):
    runs: list[int] = []

    def dangling_tag() -> None:
        runs.append(1)
        registry.get().add(Tag(note_id=999_999))

    with pytest.raises(IntegrityError):
        run_in_transaction(registry, dangling_tag, policy=FAST)

    assert runs == [1]


def test_the_transaction_managers_own_retry_loop_retries_a_storm_conflict(registry, db):
    runs: list[int] = []
    work = conflicting_increment(registry, db, runs)

    for attempt in transaction.manager.attempts(3):
        with attempt:
            work()

    assert runs == [1, 2]


def test_a_failed_commit_keeps_the_connection_for_the_next_unit_of_work(pg):
    registry = StoreRegistry({"main": pg.uri})
    try:
        before = backend_pid(registry)
        with pytest.raises(IntegrityError):  # at COMMIT: a deferred foreign key
            run_in_transaction(
                registry, lambda: registry.get().add(Tag(note_id=999_999)), policy=FAST
            )

        assert backend_pid(registry) == before
        assert pg.backends() == 1
    finally:
        transaction.abort()
        registry.release()


def test_a_failed_sqlite_commit_leaves_a_connection_the_next_unit_of_work_can_use(tmp_path):
    from tests.conftest import make_database

    db = make_database("sqlite", tmp_path)
    registry = StoreRegistry({"main": db.uri})
    try:
        first = registry.get()
        with pytest.raises(IntegrityError):
            run_in_transaction(registry, lambda: first.add(Tag(note_id=999_999)), policy=FAST)

        run_in_transaction(registry, lambda: registry.get().add(Note("next")), policy=FAST)

        assert registry.get() is first
        assert db.notes() == ["next"]
    finally:
        registry.release()


def test_a_connection_lost_during_the_commit_is_in_doubt_and_not_run_again(pg, caplog):
    registry = StoreRegistry({"main": pg.uri})
    runs: list[int] = []

    with pg.dying_at_commit() as body:

        def add_note() -> None:
            runs.append(1)
            registry.get().add(Note(body))  # the backend ends itself during the COMMIT

        try:
            with caplog.at_level(logging.ERROR), pytest.raises(CommitInDoubtError):
                run_in_transaction(registry, add_note, policy=FAST)
        finally:
            transaction.abort()
            registry.release()

    assert runs == [1]
    assert "COMMIT is in doubt" in caplog.text


# -- transact, transaction, and units inside units -----------------------------------


def test_a_transact_function_commits_what_it_did(registry, db):
    @registry.transact
    def add(body: str) -> str:
        registry.get().add(Note(body))
        return body

    assert add("kept") == "kept"
    assert db.notes() == ["kept"]


def test_a_transact_function_that_raises_commits_nothing(registry, db):
    @registry.transact
    def fail() -> None:
        registry.get().add(Note("lost"))
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        fail()
    assert db.notes() == []


def test_a_transact_function_is_run_again_after_a_transient_failure(registry, db):
    runs: list[int] = []

    @registry.transact(policy=FAST)
    def add() -> None:
        runs.append(len(runs) + 1)
        registry.get().add(Note(f"run {runs[-1]}"))
        if len(runs) == 1:
            raise TransientError("a conflict")

    add()

    assert runs == [1, 2]
    assert db.notes() == ["run 2"]


def test_a_transaction_block_commits_at_its_end_and_rolls_back_if_it_raises(registry, db):
    with registry.transaction():
        registry.get().add(Note("block"))
    with pytest.raises(RuntimeError), registry.transaction():
        registry.get().add(Note("raised"))
        raise RuntimeError("the block failed")

    assert db.notes() == ["block"]


def test_current_store_is_the_registrys_inside_a_unit_of_work(registry, db):
    from middlestorm import current_store

    @registry.transact
    def add() -> None:
        current_store.add(Note("through current_store"))

    add()

    assert db.notes() == ["through current_store"]


def test_a_nested_unit_of_work_joins_the_outer_transaction(registry, db):
    @registry.transact
    def inner() -> None:
        registry.get().add(Note("inner"))

    @registry.transact(policy=FAST)
    def outer() -> None:
        inner()
        assert db.notes() == []  # the inner unit committed nothing of its own
        raise ValueError("the outer unit fails")

    with pytest.raises(ValueError):
        outer()
    assert db.notes() == []


def test_a_nested_unit_with_a_savepoint_is_rolled_back_alone(registry, db):
    @registry.transact(savepoint=True)
    def inner() -> None:
        registry.get().add(Note("inner"))
        raise ValueError("the inner unit fails")

    @registry.transact
    def outer() -> None:
        registry.get().add(Note("outer"))
        with pytest.raises(ValueError):
            inner()
        registry.get().add(Note("after"))

    outer()

    assert db.notes() == ["outer", "after"]


def test_a_nested_transaction_block_with_a_savepoint_is_rolled_back_alone(registry, db):
    with registry.transaction():
        registry.get().add(Note("outer"))
        with pytest.raises(KeyError), registry.transaction(savepoint=True):
            registry.get().add(Note("inner"))
            raise KeyError("inner")

    assert db.notes() == ["outer"]


def test_a_unit_of_work_inside_a_request_joins_the_requests_transaction(db):
    from middlestorm import MiddleStorm
    from tests.helpers import call

    middleware = MiddleStorm(lambda environ, start_response: app(environ, start_response), db.uri)
    registry = middleware.registry

    @registry.transact
    def add() -> None:
        registry.get().add(Note("in the request"))

    def app(environ, start_response):
        add()
        start_response("500 Internal Server Error", [])
        return [b"failed after the unit"]

    try:
        assert call(middleware).status.startswith("500")
    finally:
        registry.release()
    assert db.notes() == []  # the request aborted, and the unit with it


def test_a_cancelled_unit_of_work_is_rolled_back_not_committed(registry, db):
    import threading

    from middlestorm.work import Cancelled

    cancelled = threading.Event()

    def work() -> None:
        registry.get().add(Note("cancelled"))
        cancelled.set()  # the caller stops waiting while the work runs

    with pytest.raises(Cancelled):
        run_in_transaction(registry, work, cancelled=cancelled)
    assert db.notes() == []


def test_a_unit_of_work_cancelled_before_it_begins_is_not_run(registry):
    from middlestorm.work import Cancellation, Cancelled

    cancelled, runs = Cancellation(), []
    cancelled.set()

    with pytest.raises(Cancelled, match="not run"):
        run_in_transaction(registry, lambda: runs.append(1), cancelled=cancelled)
    assert runs == []


def test_a_unit_of_work_cancelled_during_a_failed_attempt_is_not_run_again(registry, db):
    from middlestorm.work import Cancellation

    cancelled, runs = Cancellation(), []

    def work() -> None:
        runs.append(len(runs) + 1)
        registry.get().add(Note(f"run {runs[-1]}"))
        cancelled.set()  # the caller stops waiting while the attempt fails
        raise TransientError("a conflict")

    with pytest.raises(TransientError):
        run_in_transaction(registry, work, cancelled=cancelled, policy=FAST)
    assert runs == [1]
    assert db.notes() == []


def test_a_cancelled_error_raised_by_the_work_rolls_its_transaction_back(registry, db):
    from middlestorm.work import Cancelled

    def work() -> None:
        registry.get().add(Note("rolled back"))
        registry.get().flush()
        raise Cancelled("a nested unit of work was cancelled")

    with pytest.raises(Cancelled):
        run_in_transaction(registry, work)
    assert db.notes() == []
    assert db.idle_in_transaction() == 0
    registry.get().add(Note("next"))  # the thread's next unit of work begins cleanly
    transaction.commit()
    assert db.notes() == ["next"]


def test_units_of_work_in_many_threads_each_use_their_own_store(registry, db):
    from concurrent.futures import ThreadPoolExecutor

    @registry.transact
    def add(number: int) -> int:
        store = registry.get()
        store.add(Note(f"note {number}"))
        return id(store)

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(add, range(20)))

    assert sorted(db.notes()) == sorted(f"note {n}" for n in range(20))
    assert len(set(stores)) <= 4


def test_a_row_that_violates_a_constraint_is_skipped_alone_in_a_savepoint(registry, db):
    @registry.transact
    def import_rows(ids: list[int]) -> None:
        for note_id in ids:
            try:
                with registry.transaction(savepoint=True):
                    note = Note(f"row {note_id}")
                    note.id = note_id
                    registry.get().add(note)
                    registry.get().flush()
            except IntegrityError:
                pass

    import_rows([1, 2, 1, 3])  # the second 1 is a duplicate key

    assert db.notes() == ["row 1", "row 2", "row 3"]
