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
