"""Twisted: units of work as Deferreds, with a real reactor (one process per scenario)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_stores import wait_for

ROOT = Path(__file__).resolve().parent.parent


def scenario(name: str, db) -> dict:
    """Run ``tests/twisted_scenarios.py``'s scenario ``name`` against ``db``; what it saw."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.twisted_scenarios", name, db.uri],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_thousand_concurrent_deferreds_use_at_most_eight_threads_and_stores(db):
    seen = scenario("many", db)

    assert seen["exit"] == 0
    assert seen["numbers"] == list(range(1000))
    assert seen["threads"] <= 8
    assert len(db.notes()) == 1000
    if db.kind == "postgres":
        assert seen["backends"] <= 8
        assert wait_for(lambda: db.backends() == 0)  # nothing left once the reactor stopped


def test_calls_made_one_after_the_other_reuse_one_thread(db):
    assert scenario("one_by_one", db)["threads"] == 1


def test_calls_still_waiting_when_the_reactor_stops_are_run_before_it_exits(db):
    seen = scenario("shutdown", db)

    assert seen["exit"] == 0
    assert seen["heard"] == 40  # and their Deferreds fired
    assert sorted(db.notes()) == sorted(f"note {number}" for number in range(40))
    if db.kind == "postgres":
        assert wait_for(lambda: db.backends() == 0)


def test_a_call_made_after_the_reactor_shut_down_fails_loudly_and_runs_nothing(db):
    seen = scenario("after_shutdown", db)

    assert "stopped" in seen["error"]
    assert db.notes() == ["in time"]


def test_a_call_cancelled_while_waiting_never_runs_and_cancelling_logs_nothing(db):
    seen = scenario("cancel_waiting", db)

    assert seen["runs"] == ["first"]
    assert seen["logged"] == []


def test_a_failure_is_the_errback_and_nothing_is_committed(db):
    assert scenario("failure", db)["error"] == "bad input"
    assert db.notes() == []


def test_a_transient_failure_is_run_again(db):
    assert scenario("retry", db)["runs"] == 2
    assert db.notes() == ["run 2"]


def test_a_storm_object_returned_to_the_reactor_is_refused_and_rolled_back(db):
    assert scenario("live", db)["error"] == "LiveObjectError"
    assert db.notes() == []


def test_cancelling_the_deferred_rolls_the_unit_of_work_back(db):
    assert scenario("cancel", db)["outcome"] == "cancelled"
    assert db.notes() == []


@pytest.mark.parametrize("workers", [0, 2.5])
def test_a_bad_number_of_workers_is_refused(registry, workers):
    from middlestorm import ConfigurationError
    from middlestorm.twisted import DeferredStores

    with pytest.raises(ConfigurationError, match="workers must be a whole number"):
        DeferredStores(registry, workers=workers)


def test_the_avatar_example_prints_a_line_for_each_login_looked_up_at_once(db):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "example_app.avatars", db.uri, "alice", "nobody", "bob"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "Alice Liddell (alice) has the avatar a white rabbit",
        "nobody: no such user",
        "Bob Dobbs (bob) has the avatar a pipe",
    ]


def test_middlestorm_itself_does_not_import_twisted():
    code = "import sys, middlestorm, middlestorm.aio; print('twisted' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )

    assert done.stdout.strip() == "False", done.stderr
