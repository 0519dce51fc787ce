"""Which failures are transient, in doubt or permanent, and how long a retry waits."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from storm.database import create_database
from storm.exceptions import DisconnectionError, IntegrityError
from storm.store import Store
from transaction.interfaces import TransientError

from middlestorm import CommitInDoubtError, ConfigurationError, RetryPolicy
from middlestorm.retry import Verdict, classify, sqlstate
from tests.models import Counter, Note, Tag


def failure_of(function):
    with pytest.raises(Exception) as caught:
        function()
    return caught.value


def test_a_serialization_failure_is_transient_by_its_sqlstate(pg):
    store = Store(create_database(pg.uri))
    try:
        assert store.get(Counter, 1).value == 0  # the snapshot is taken
        pg.run("UPDATE counter SET value = value + 1 WHERE id = 1")
        error = failure_of(lambda: store.execute("UPDATE counter SET value = 9 WHERE id = 1"))
    finally:
        store.rollback()
        store.close()

    assert sqlstate(error) == "40001"
    assert classify(error) is Verdict.TRANSIENT


def test_a_deadlock_is_transient_by_its_sqlstate(pg):
    first, second = Store(create_database(pg.uri)), Store(create_database(pg.uri))
    errors: list[BaseException] = []
    both_hold_one = threading.Barrier(2, timeout=10)

    def lock(store, mine: int, theirs: int) -> None:
        try:
            store.execute(f"UPDATE counter SET value = 1 WHERE id = {mine}")
            both_hold_one.wait()
            store.execute(f"UPDATE counter SET value = 1 WHERE id = {theirs}")
        except Exception as error:
            errors.append(error)
        finally:
            store.rollback()

    threads = [
        threading.Thread(target=lock, args=(first, 1, 2)),
        threading.Thread(target=lock, args=(second, 2, 1)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    first.close(), second.close()

    (error,) = errors  # PostgreSQL breaks the deadlock by failing one of them
    assert sqlstate(error) == "40P01"
    assert classify(error) is Verdict.TRANSIENT


def test_a_constraint_violation_is_permanent(db):
    store = Store(create_database(db.uri))
    try:
        store.add(Tag(note_id=999_999))
        error = failure_of(store.commit)
    finally:
        store.rollback()
        store.close()

    assert isinstance(error, IntegrityError)
    assert classify(error) is Verdict.PERMANENT


def test_a_locked_sqlite_database_is_transient(tmp_path):
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT)")
    holder.execute("BEGIN IMMEDIATE")
    store = Store(create_database(f"sqlite:{path}?timeout=0.1"))
    try:
        store.add(Note("waits for the lock"))
        error = failure_of(store.flush)
    finally:
        store.rollback()
        store.close()
        holder.close()

    assert classify(error) is Verdict.TRANSIENT


def test_a_dropped_connection_is_transient(pg):
    store = Store(create_database(pg.uri))
    try:
        store.execute("SELECT 1")
        pg.run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = '{pg.name}'"
        )
        error = failure_of(lambda: store.execute("SELECT 1"))
    finally:
        store.rollback()
        store.close()

    assert isinstance(error, DisconnectionError)
    assert classify(error) is Verdict.TRANSIENT


def test_a_commit_in_doubt_is_never_transient():
    assert classify(CommitInDoubtError("lost during COMMIT")) is Verdict.IN_DOUBT


@pytest.mark.parametrize(
    ("cause", "verdict"),
    [
        (TransientError("a conflict"), Verdict.TRANSIENT),
        (CommitInDoubtError("lost during COMMIT"), Verdict.IN_DOUBT),
    ],
    ids=["transient", "in doubt"],
)
def test_a_cause_wrapped_in_another_error_keeps_its_verdict(cause, verdict):
    try:
        try:
            raise cause
        except type(cause) as wrapped:
            raise RuntimeError("the view failed") from wrapped
    except RuntimeError as error:
        assert classify(error) is verdict


def test_an_ordinary_error_is_permanent():
    assert classify(ValueError("bad input")) is Verdict.PERMANENT


def test_each_wait_is_at_most_the_doubling_bound():
    policy = RetryPolicy(attempts=10, backoff=0.1, max_backoff=0.35, deadline=100)

    for attempt, bound in [(1, 0.1), (2, 0.2), (3, 0.35), (6, 0.35)]:
        waits = [policy.delay(attempt, elapsed=0) for _ in range(200)]
        assert all(wait is not None and 0 <= wait <= bound for wait in waits)
        assert max(waits) > bound / 2  # drawn from the whole range, not a fixed step


def test_no_wait_is_given_after_the_last_attempt_or_past_the_deadline():
    policy = RetryPolicy(attempts=3, backoff=0.1, deadline=1.0)

    assert policy.delay(3, elapsed=0) is None
    assert policy.delay(1, elapsed=1.0) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": 0}, "attempts must be a whole number >= 1"),
        ({"backoff": -1}, "backoff must be a number of seconds"),
        ({"deadline": "soon"}, "deadline must be a number of seconds"),
        ({"retry_after": 1.5}, "retry_after must be a whole number"),
    ],
)
def test_a_bad_policy_is_refused_with_a_message_naming_the_setting(options, message):
    with pytest.raises(ConfigurationError, match=message):
        RetryPolicy(**options)
