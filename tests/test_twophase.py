"""Two-phase commit across PostgreSQL stores, and recovery of what a crash leaves prepared.

The two databases live in two clusters of the session's own
(``tests/pgcluster.py``), with ``max_prepared_transactions`` set, so that one
can be stopped while the other runs. Store "a" decides (it comes first by
name). A crash of the application is a forked child that leaves with
``os._exit`` at the chosen moment; a lost reply is a proxy that cuts the
connection after passing a statement on (``tests/cutting_proxy.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
import transaction
from storm.tracer import install_tracer, remove_tracer

from middlestorm import (
    CommitInDoubtError,
    ConfigurationError,
    MiddleStorm,
    StoreRegistry,
    Timeouts,
    run_in_transaction,
    twophase,
)
from middlestorm.retry import RetryPolicy
from tests.conftest import POSTGRES_URI
from tests.cutting_proxy import CuttingProxy
from tests.helpers import DataManager, call
from tests.pgcluster import ClusterDatabase, PrivateCluster

pytestmark = pytest.mark.postgres

ONCE = RetryPolicy(attempts=1)
#: The exit status of a child that crashed where the test meant it to.
CRASHED = 17


@pytest.fixture
def dbs(
    pg_cluster: PrivateCluster, other_cluster: PrivateCluster
) -> Iterator[tuple[ClusterDatabase, ClusterDatabase]]:
    """A database on each cluster, with the tests' tables; the first store decides."""
    made = []
    for cluster in (pg_cluster, other_cluster):
        cluster.ensure_running()
        made.append(cluster.create_database())
    yield made[0], made[1]
    for database in made:
        database.cluster.ensure_running()
        for (gid,) in database.query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        ):
            database.query(f"ROLLBACK PREPARED '{gid}'")
        database.drop()


@pytest.fixture
def registry(dbs) -> StoreRegistry:
    first, second = dbs
    return StoreRegistry({"a": first.uri(), "b": second.uri()}, two_phase=True)


def write_both(registry: StoreRegistry, body: str) -> Callable[[], None]:
    """A unit of work that adds the note ``body`` in both databases, store "a" first."""

    def work() -> None:
        for name in ("a", "b"):
            registry.get(name).execute("INSERT INTO note (body) VALUES (?)", (body,))

    return work


def prepared(database: ClusterDatabase) -> list[str]:
    return [
        gid
        for (gid,) in database.query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        )
    ]


class AtFirstCommit:
    """A Storm tracer that runs ``action`` after the first COMMIT it sees: the decider's."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.done = False

    def connection_commit(self, connection, xid=None) -> None:
        if not self.done:
            self.done = True
            self.action()


class CrashAtVote(DataManager):
    """A data manager voting after every store was prepared, that ends the process."""

    def sortKey(self) -> str:
        return "zzzz_crash"

    def tpc_vote(self, txn) -> None:
        os._exit(CRASHED)


def crash_after_the_decision(uris: dict[str, str], body: str) -> None:
    """In a child process: write ``body`` to both stores, and die once the first committed."""

    def crash() -> None:
        registry = StoreRegistry(uris, two_phase=True)
        install_tracer(AtFirstCommit(lambda: os._exit(CRASHED)))
        run_in_transaction(registry, write_both(registry, body), policy=ONCE)

    crash_in_child(crash)


def crash_in_child(function: Callable[[], object]) -> None:
    """Run ``function`` in a forked child that must die with status ``CRASHED``."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            function()
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == CRASHED, "the child did not crash as planned"


# -- committing --------------------------------------------------------------------


def test_a_transaction_that_writes_to_two_databases_commits_in_both(dbs, registry):
    run_in_transaction(registry, write_both(registry, "both"), policy=ONCE)

    assert [db.notes() for db in dbs] == [["both"], ["both"]]
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_transaction_that_fails_commits_in_neither(dbs, registry):
    def fail() -> None:
        write_both(registry, "neither")()
        raise RuntimeError("the app failed")

    with pytest.raises(RuntimeError):
        run_in_transaction(registry, fail, policy=ONCE)

    assert [db.notes() for db in dbs] == [[], []]
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_second_database_refusing_to_prepare_rolls_back_the_first(dbs, registry):
    first, second = dbs
    second.run(
        "ALTER TABLE note ADD CONSTRAINT note_body_unique UNIQUE (body) INITIALLY DEFERRED",
        "INSERT INTO note (body) VALUES ('taken')",
    )  # a deferred constraint is checked by PREPARE TRANSACTION

    with pytest.raises(Exception, match="note_body_unique"):
        run_in_transaction(registry, write_both(registry, "taken"), policy=ONCE)

    assert first.notes() == []
    assert second.notes() == ["taken"]
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_transaction_one_store_joined_commits_in_one_phase(pg):
    # The shared server has max_prepared_transactions = 0: a PREPARE would fail.
    registry = StoreRegistry({"main": POSTGRES_URI, "other": POSTGRES_URI}, two_phase=True)

    def write() -> None:
        registry.get().execute("INSERT INTO note (body) VALUES ('one phase')")

    run_in_transaction(registry, write, policy=ONCE)

    assert pg.notes() == ["one phase"]


def test_a_request_that_writes_to_two_databases_commits_in_both(dbs, registry):
    def app(environ, start_response):
        write_both(registry, "request")()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"saved"]

    exchange = call(MiddleStorm(app, registry))

    assert (exchange.status, exchange.data) == ("200 OK", b"saved")
    assert [db.notes() for db in dbs] == [["request"], ["request"]]


def test_a_store_that_only_read_takes_no_part_in_the_two_phase_commit(pg):
    # The shared server has max_prepared_transactions = 0: a PREPARE would fail.
    registry = StoreRegistry({"main": POSTGRES_URI, "reader": POSTGRES_URI}, two_phase=True)

    def write_one_read_other() -> None:
        registry.get("reader").execute("SELECT count(*) FROM note").get_one()
        registry.get("main").execute("INSERT INTO note (body) VALUES ('one writer')")

    run_in_transaction(registry, write_one_read_other, policy=ONCE)

    assert pg.notes() == ["one writer"]


def test_a_store_whose_transaction_failed_earlier_stops_the_others_from_committing(dbs, registry):
    def swallow_an_error() -> None:
        write_both(registry, "half")()
        with contextlib.suppress(Exception):  # the app carries on; b's transaction is over
            registry.get("b").execute("SELECT 1 / 0")

    with pytest.raises(Exception, match="current transaction is aborted|had failed"):
        run_in_transaction(registry, swallow_an_error, policy=ONCE)

    assert [db.notes() for db in dbs] == [[], []]
    assert [prepared(db) for db in dbs] == [[], []]


def test_an_error_raised_after_the_deciding_commit_succeeded_still_commits_all(dbs, registry):
    def fail_once() -> None:
        raise RuntimeError("a tracer failed after the COMMIT")

    tracer = AtFirstCommit(fail_once)
    install_tracer(tracer)
    try:
        run_in_transaction(registry, write_both(registry, "committed"), policy=ONCE)
    finally:
        remove_tracer(tracer)

    assert tracer.done
    assert [db.notes() for db in dbs] == [["committed"], ["committed"]]
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_part_recovery_committed_first_counts_as_committed(dbs, registry):
    uris = {"a": dbs[0].uri(), "b": dbs[1].uri()}

    class RecoverBetweenTheCommits(DataManager):
        def sortKey(self) -> str:
            return "zz_a~"  # after the decider "a", before "b"

        def tpc_finish(self, txn) -> None:
            [self.resolution] = twophase.recover(StoreRegistry(uris, two_phase=True), grace=0)

    between = RecoverBetweenTheCommits()

    def work() -> None:
        write_both(registry, "both")()
        transaction.get().join(between)

    run_in_transaction(registry, work, policy=ONCE)

    assert between.resolution.outcome == "committed"
    assert [db.notes() for db in dbs] == [["both"], ["both"]]


# -- a database lost between the phases ------------------------------------------------


def test_the_second_database_dying_after_the_decision_is_committed_by_recovery(
    dbs, registry, other_cluster
):
    first, second = dbs
    killer = AtFirstCommit(lambda: other_cluster.stop("immediate"))
    install_tracer(killer)
    try:
        with pytest.raises(CommitInDoubtError, match="is committed, but the COMMIT PREPARED"):
            run_in_transaction(registry, write_both(registry, "decided"), policy=ONCE)
    finally:
        remove_tracer(killer)
    assert killer.done
    other_cluster.start()
    assert first.notes() == ["decided"]
    assert second.notes() == []  # prepared, not yet committed

    left = twophase.in_doubt(registry)
    resolutions = twophase.recover(registry)

    assert [branch.branch for branch in left] == ["b"]
    assert [(r.outcome, r.left) for r in resolutions] == [("committed", ())]
    assert [db.notes() for db in dbs] == [["decided"], ["decided"]]
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_store_after_the_one_that_failed_is_committed_at_once(dbs, pg_cluster, other_cluster):
    first, second = dbs
    third = pg_cluster.create_database()
    try:
        uris = {"a": first.uri(), "b": second.uri(), "c": third.uri()}
        registry = StoreRegistry(uris, two_phase=True)

        def work() -> None:
            for name in ("a", "b", "c"):
                registry.get(name).execute("INSERT INTO note (body) VALUES ('three')")

        killer = AtFirstCommit(lambda: other_cluster.stop("immediate"))
        install_tracer(killer)
        try:
            with pytest.raises(CommitInDoubtError):
                run_in_transaction(registry, work, policy=ONCE)
        finally:
            remove_tracer(killer)
        other_cluster.start()

        # "b" failed to commit, so the transaction manager never asked "c" to:
        # it is committed all the same, not rolled back.
        assert [first.notes(), second.notes(), third.notes()] == [["three"], [], ["three"]]
        assert prepared(third) == []
        twophase.recover(registry)
        assert second.notes() == ["three"]
    finally:
        third.drop()


def test_a_thread_whose_commit_was_cut_off_works_again_once_the_database_is_back(
    dbs, registry, other_cluster
):
    killer = AtFirstCommit(lambda: other_cluster.stop("immediate"))
    install_tracer(killer)
    try:
        with pytest.raises(CommitInDoubtError):
            run_in_transaction(registry, write_both(registry, "first"), policy=ONCE)
    finally:
        remove_tracer(killer)
    other_cluster.start()
    twophase.recover(registry)

    run_in_transaction(registry, write_both(registry, "second"), policy=ONCE)

    assert [db.notes() for db in dbs] == [["first", "second"], ["first", "second"]]


# -- the application crashing between the phases ------------------------------------


def test_a_crash_after_every_prepare_but_before_the_decision_is_rolled_back(dbs):
    first, second = dbs
    uris = {"a": first.uri(), "b": second.uri()}

    def crash() -> None:
        registry = StoreRegistry(uris, two_phase=True)
        transaction.manager.begin()
        write_both(registry, "undecided")()
        transaction.get().join(CrashAtVote())
        transaction.manager.commit()

    crash_in_child(crash)
    registry = StoreRegistry(uris, two_phase=True)
    assert [(b.branch, b.decider) for b in twophase.in_doubt(registry)] == [("b", "a")]

    [resolution] = twophase.recover(registry)

    assert resolution.outcome == "rolled back"
    assert [db.notes() for db in dbs] == [[], []]
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_crash_after_the_decision_is_committed_by_recovery(dbs):
    first, second = dbs
    uris = {"a": first.uri(), "b": second.uri()}

    crash_after_the_decision(uris, "decided")
    registry = StoreRegistry(uris, two_phase=True)
    assert first.notes() == ["decided"]
    assert second.notes() == []

    [resolution] = twophase.recover(registry)

    assert resolution.outcome == "committed"
    assert [db.notes() for db in dbs] == [["decided"], ["decided"]]
    assert [prepared(db) for db in dbs] == [[], []]


def test_recovery_leaves_a_transaction_that_is_still_committing_alone(dbs, registry):
    uris = {"a": dbs[0].uri(), "b": dbs[1].uri()}

    class RecoverMeanwhile(DataManager):
        """Runs recover() once "b" is prepared, before "a" commits."""

        def sortKey(self) -> str:
            return "zzzz_recover"

        def tpc_vote(self, txn) -> None:
            self.resolutions = twophase.recover(StoreRegistry(uris, two_phase=True))

    meanwhile = RecoverMeanwhile()

    def work() -> None:
        write_both(registry, "live")()
        transaction.get().join(meanwhile)

    run_in_transaction(registry, work, policy=ONCE)

    assert [r.outcome for r in meanwhile.resolutions] == ["undecided"]
    assert [db.notes() for db in dbs] == [["live"], ["live"]]
    assert [prepared(db) for db in dbs] == [[], []]


def test_recovery_leaves_other_applications_prepared_transactions_alone(dbs, registry):
    _, second = dbs
    foreign = second.cluster.connect(second.name)
    try:
        foreign.autocommit = False
        foreign.cursor().execute("INSERT INTO note (body) VALUES ('theirs')")
        foreign.cursor().execute("PREPARE TRANSACTION 'someone-else'")
    finally:
        foreign.close()
    # Another application whose store "a" is another database prepared this one.
    theirs = "middlestorm:" + "f" * 8 + ":12345:678:a:b"
    foreign = second.cluster.connect(second.name)
    try:
        foreign.autocommit = False
        foreign.cursor().execute("INSERT INTO note (body) VALUES ('also theirs')")
        foreign.cursor().execute("PREPARE TRANSACTION %s", (theirs,))
    finally:
        foreign.close()

    [resolution] = twophase.recover(registry)

    assert resolution.outcome == "undecided"
    assert [(b.gid, b.resolvable) for b in twophase.in_doubt(registry)] == [(theirs, False)]
    assert sorted(prepared(second)) == sorted(["someone-else", theirs])


# -- configuration -----------------------------------------------------------------


def test_two_phase_commit_refuses_a_database_other_than_postgresql(tmp_path):
    with pytest.raises(ConfigurationError, match="two-phase commit needs PostgreSQL"):
        StoreRegistry({"main": f"sqlite:{tmp_path}/app.db"}, two_phase=True)


def test_two_phase_commit_refuses_a_store_name_too_long_for_a_branch_id():
    with pytest.raises(ConfigurationError, match="store names of 1 to 64 letters"):
        StoreRegistry({"x" * 65: POSTGRES_URI}, two_phase=True)


def test_two_phase_commit_refuses_a_store_name_it_cannot_put_in_a_transaction_id():
    with pytest.raises(ConfigurationError, match="letters, digits"):
        StoreRegistry({"bücher": POSTGRES_URI}, two_phase=True)


def test_storms_own_two_phase_mode_is_refused_for_the_registrys(registry):
    with pytest.raises(ConfigurationError, match="two_phase=True"):
        registry.set_default_tpc("a", True)


# -- what the review found ----------------------------------------------------------


@pytest.fixture
def proxied(dbs, pg_cluster):
    """A registry whose deciding store "a" reaches its database through a cutting proxy."""
    first, second = dbs
    proxy = CuttingProxy(pg_cluster.port)
    uri = first.uri().replace(f":{pg_cluster.port}/", f":{proxy.port}/")
    yield proxy, StoreRegistry({"a": uri, "b": second.uri()}, two_phase=True)
    proxy.close()


def test_a_lost_reply_to_the_deciding_commit_is_settled_as_committed(dbs, proxied):
    proxy, registry = proxied
    run_in_transaction(registry, write_both(registry, "warm up"), policy=ONCE)
    proxy.arm(b"COMMIT")

    run_in_transaction(registry, write_both(registry, "decided"), policy=ONCE)

    assert proxy.cut.is_set()
    assert [db.notes() for db in dbs] == [["warm up", "decided"]] * 2
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_deciding_commit_that_never_arrived_is_settled_as_rolled_back_and_run_again(dbs, proxied):
    proxy, registry = proxied
    run_in_transaction(registry, write_both(registry, "warm up"), policy=ONCE)
    proxy.arm(b"COMMIT", forward=False)
    attempts = []

    def work() -> None:
        attempts.append(len(attempts) + 1)
        write_both(registry, f"attempt {attempts[-1]}")()

    run_in_transaction(registry, work)

    assert attempts == [1, 2]
    assert [db.notes() for db in dbs] == [["warm up", "attempt 2"]] * 2
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_lost_reply_to_a_prepare_leaves_nothing_prepared_for_the_retry_to_wait_on(
    dbs, pg_cluster, other_cluster
):
    first, second = dbs
    proxy = CuttingProxy(other_cluster.port)
    try:
        uri = second.uri().replace(f":{other_cluster.port}/", f":{proxy.port}/")
        registry = StoreRegistry({"a": first.uri(), "b": uri}, two_phase=True)
        run_in_transaction(registry, write_both(registry, "warm up"), policy=ONCE)
        second.run(
            "UPDATE counter SET value = 0",
            # A PREPARE that takes 2 s: its reply is lost while it still runs.
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
            "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON note DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW EXECUTE FUNCTION slow()",
        )
        proxy.arm(b"PREPARE TRANSACTION")

        def work() -> None:
            write_both(registry, "once")()
            registry.get("b").execute("UPDATE counter SET value = value + 1 WHERE id = 1")

        run_in_transaction(registry, work, timeouts=Timeouts(statement=10))
    finally:
        proxy.close()

    assert proxy.cut.is_set()
    assert [db.notes() for db in dbs] == [["warm up", "once"]] * 2
    assert second.counters()[0] == 1
    assert [prepared(db) for db in dbs] == [[], []]


def test_a_part_out_of_reach_is_committed_by_a_later_recovery(dbs, other_cluster):
    first, second = dbs
    uris = {"a": first.uri(), "b": second.uri()}
    crash_after_the_decision(uris, "kept")
    registry = StoreRegistry(uris, two_phase=True)
    other_cluster.stop()
    try:
        assert twophase.recover(registry) == []  # "b", the only part left, is out of reach
    finally:
        other_cluster.start()

    [resolution] = twophase.recover(registry)

    assert resolution.outcome == "committed"
    assert [db.notes() for db in dbs] == [["kept"], ["kept"]]


def test_a_store_the_app_commits_itself_takes_part_in_the_two_phase_commit(dbs, registry):
    def work() -> None:
        store = registry.get("b")
        store.execute("INSERT INTO note (body) VALUES ('early')")
        store.commit()
        write_both(registry, "late")()

    run_in_transaction(registry, work, policy=ONCE)

    assert [db.notes() for db in dbs] == [["late"], ["early", "late"]]


def test_a_store_first_used_while_the_transaction_commits_stays_usable(dbs, registry):
    class UsesAStoreWhileVoting(DataManager):
        def sortKey(self) -> str:
            return "zzzz_late"

        def tpc_vote(self, txn) -> None:
            registry.get("b").execute("SELECT 1")

    def work() -> None:
        registry.get("a").execute("INSERT INTO note (body) VALUES ('refused')")
        transaction.get().join(UsesAStoreWhileVoting())

    with pytest.raises(ValueError, match="expected txn status"):
        run_in_transaction(registry, work, policy=ONCE)
    run_in_transaction(registry, write_both(registry, "afterwards"), policy=ONCE)

    assert [db.notes() for db in dbs] == [["afterwards"], ["afterwards"]]


def test_a_rollback_after_another_data_manager_committed_is_in_doubt_not_run_again(dbs, proxied):
    proxy, registry = proxied

    sent: list[str] = []

    class Mailer(DataManager):
        def sortKey(self) -> str:
            return "mail"  # commits before the stores

        def tpc_finish(self, txn) -> None:
            sent.append("mail")

    def work() -> None:
        write_both(registry, "with mail")()
        transaction.get().join(Mailer())

    run_in_transaction(registry, write_both(registry, "warm up"), policy=ONCE)
    proxy.arm(b"COMMIT", forward=False)

    with pytest.raises(CommitInDoubtError):
        run_in_transaction(registry, work)

    assert sent == ["mail"]  # sent once: the request was not run again


def test_a_store_that_only_read_does_not_stop_a_rolled_back_commit_from_running_again(
    dbs, pg_cluster
):
    first, second = dbs
    proxy = CuttingProxy(pg_cluster.port)
    try:
        decider = first.uri().replace(f":{pg_cluster.port}/", f":{proxy.port}/")
        registry = StoreRegistry(
            {"a": second.uri(), "b": decider, "c": second.uri()}, two_phase=True
        )
        attempts = []

        def work() -> None:
            attempts.append(len(attempts) + 1)
            registry.get("a").execute("SELECT count(*) FROM note").get_one()  # reads only
            for name in ("b", "c"):
                registry.get(name).execute(
                    "INSERT INTO note (body) VALUES (?)", (f"attempt {attempts[-1]}",)
                )

        run_in_transaction(registry, lambda: registry.get("b").execute("SELECT 1"), policy=ONCE)
        proxy.arm(b"COMMIT", forward=False)
        run_in_transaction(registry, work)
    finally:
        proxy.close()

    assert attempts == [1, 2]
    assert [db.notes() for db in dbs] == [["attempt 2"], ["attempt 2"]]
