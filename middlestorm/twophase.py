"""Two-phase commit across a registry's PostgreSQL stores, and recovery after a crash.

With ``StoreRegistry(..., two_phase=True)``, a transaction in which more than
one store wrote commits so that every database commits or none does:

1. each store that joined is asked whether its transaction wrote
   (``pg_current_xact_id_if_assigned()``); one that only read is committed
   at once and takes no further part;
2. the first writer in name order, the *decider*, is not prepared: its
   transaction id and session are named in the id of every other writer's
   prepared transaction (``PREPARE TRANSACTION``);
3. the decider commits, in one phase: that commits the whole transaction;
4. the others commit (``COMMIT PREPARED``).

One writer commits in one phase, as it would without two-phase commit.

Whenever the decider's COMMIT may or may not have happened (its connection
was lost, a crash), PostgreSQL itself tells: ``pg_xact_status()`` of its
transaction id is ``committed`` or ``aborted``; a decider still ``in
progress`` whose client is gone has its session ended first. No table, no
guess from the age of a transaction: :func:`recover` settles what a crash
left prepared the same way, and may run while the application runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from storm.database import STATE_RECONNECT
from storm.databases.postgres import Postgres
from storm.exceptions import DisconnectionError
from storm.store import Store
from transaction.interfaces import TransientError

from middlestorm import handoff
from middlestorm.errors import CommitInDoubtError, ConfigurationError, MiddleStormError
from middlestorm.retry import sqlstate

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["CommitRolledBack", "PreparedBranch", "Resolution", "in_doubt", "recover"]

log = logging.getLogger(__name__)

#: How every prepared transaction of middlestorm's is named.
PREFIX = "middlestorm:"
#: The store names two-phase commit takes: they name the prepared transactions.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GID = re.compile(
    r"middlestorm:(?P<key>[0-9a-f]{8}):(?P<xid>\d{1,20}):(?P<pid>\d{1,10}):"
    r"(?P<decider>[A-Za-z0-9_.-]{1,64}):(?P<branch>[A-Za-z0-9_.-]{1,64})"
)
_UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a transaction that is gone
#: How long ending a session whose client is gone may take.
TERMINATE_TIMEOUT_MS = 5000


class CommitRolledBack(MiddleStormError, TransientError):
    """The deciding COMMIT's connection was lost, and the transaction was found rolled back.

    Nothing of it was committed, so it may be run again.
    """


def check_database(name: str, database: object) -> None:
    """Refuse a store two-phase commit cannot include.

    :raises ConfigurationError: for a database other than PostgreSQL, or a
        name that cannot be part of a prepared transaction's id.
    """
    if not isinstance(database, Postgres):
        raise ConfigurationError(
            f"two-phase commit needs PostgreSQL, and the store {name!r} is "
            f"{type(database).__name__}: use a registry without two_phase for it"
        )
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"two-phase commit takes store names of 1 to 64 letters, digits, '_', '.' or '-' "
            f"(they name its prepared transactions), not {name!r}"
        )


def database_key(registry: StoreRegistry, name: str) -> str:
    """What tells the database of the store ``name`` from others: its URI, hashed."""
    return hashlib.sha256(registry._default_uris[name].encode()).hexdigest()[:8]


class Commit:
    """The commit of one transaction across a registry's stores."""

    def __init__(self, registry: StoreRegistry) -> None:
        self.registry = registry
        #: The registry's stores that joined, by name.
        self.members: dict[str, Store] = {}
        self.voted = False
        #: Stores that only read: committed at the vote.
        self.readers: set[str] = set()
        self.decider: str | None = None
        self.gtrid = ""
        self.xid = 0
        self.pid = 0
        #: Stores whose PREPARE was sent, with their session's backend pid.
        self.preparing: dict[str, int] = {}
        #: Stores committed or rolled back, and done with.
        self.finished: set[str] = set()
        #: The decider's COMMIT was sent.
        self.deciding = False
        #: True once committed, False once rolled back; None before, or when unknown.
        self.decided: bool | None = None

    def gid(self, name: str) -> str:
        return f"{self.gtrid}:{name}"

    @staticmethod
    def sort_key(name: str) -> str:
        """Stores vote and commit in name order, after other data managers (as Storm's do)."""
        return f"zz_{name}"

    # -- the phases ---------------------------------------------------------

    def vote(self) -> None:
        """At the first store's vote: set readers aside, choose the decider, prepare the rest."""
        if self.voted:
            return
        self.voted = True
        if len(self.members) < 2:
            return
        writers: list[tuple[str, Store, int]] = []
        for name, store in sorted(self.members.items()):
            result = store.execute("SELECT pg_current_xact_id_if_assigned()::text")
            xid = result.get_one()[0]
            if xid is None:
                store.commit()  # it only read: nothing of it to coordinate
                self.readers.add(name)
                self.finished.add(name)
            else:
                writers.append((name, store, int(xid)))
        if len(writers) < 2:
            return  # one writer: one phase
        self.decider, decider, self.xid = writers[0]
        self.pid = _backend_pid(decider)
        key = database_key(self.registry, self.decider)
        self.gtrid = f"{PREFIX}{key}:{self.xid}:{self.pid}:{self.decider}"
        for name, store, _ in writers[1:]:
            self.preparing[name] = _backend_pid(store)
            result = store.execute("PREPARE TRANSACTION ?", (self.gid(name),))
            status = result._raw_cursor.statusmessage
            result.close()
            if status != "PREPARE TRANSACTION":  # PostgreSQL rolled back a failed transaction
                del self.preparing[name]
                raise ConfigurationError(
                    f"the transaction of the store {name!r} had failed (an error the "
                    "application caught) and was rolled back, so none of the stores commit; "
                    "after a failed statement, roll back (a savepoint) or let the error through"
                )

    def finish(self, store: Store, name: str, commit_store: Callable[[], None]) -> bool:
        """Commit ``store``'s part: in one phase, the decider's COMMIT, or a COMMIT PREPARED.

        :returns: false for a store whose part had ended already (it only read).
        :raises: what committing the part raised, unless the outcome could be
            settled as committed.
        """
        if name in self.finished:
            return False
        if name in self.preparing:
            self._end_prepared(store, name, commit=True)
        elif name == self.decider:
            self._finish_decider(commit_store)
        else:
            commit_store()  # one phase
        self.finished.add(name)
        return True

    def _finish_decider(self, commit_store: Callable[[], None]) -> None:
        self.deciding = True
        try:
            commit_store()
        except BaseException as error:
            self.decided = _settle(self.registry, self.decider or "", self.xid, self.pid)
            if self.decided:
                log.warning(
                    "the COMMIT of %s failed (%s: %s), but the transaction is committed",
                    self.gtrid,
                    type(error).__name__,
                    str(error).strip(),
                )
                return
            if self.decided is None:
                raise CommitInDoubtError(
                    f"the COMMIT of {self.gtrid} failed ({type(error).__name__}: "
                    f"{str(error).strip()}) and its outcome could not be settled: its other "
                    "parts stay prepared until middlestorm.twophase.recover() settles them"
                ) from error
            if isinstance(error, DisconnectionError):
                raise CommitRolledBack(
                    f"the connection was lost during the COMMIT of {self.gtrid}, which was "
                    "found rolled back: nothing of it was committed"
                ) from error
            raise
        self.decided = True

    def settle(self, store: Store, name: str) -> None:
        """End the part of a store the transaction aborts, as the decider's outcome says.

        A prepared part is committed if the decider committed, left prepared
        for :func:`recover` if that is unknown, and rolled back otherwise.
        """
        if name in self.finished:
            return
        self.finished.add(name)
        if name not in self.preparing:
            store.rollback()
        elif self.decided is None and self.deciding:
            log.error(
                "the outcome of %s is unknown: the part of the store %r stays prepared, "
                "holding its locks, until middlestorm.twophase.recover() settles it",
                self.gtrid,
                name,
            )
            _reset(store, lost=True)
        else:
            try:
                self._end_prepared(store, name, commit=bool(self.decided))
            except Exception:
                log.exception("ending the prepared part of the store %r failed", name)

    def _end_prepared(self, store: Store, name: str, *, commit: bool) -> None:
        """COMMIT or ROLLBACK PREPARED on the store's connection, else on one of its own."""
        verb = "COMMIT" if commit else "ROLLBACK"
        gid = self.gid(name)
        self.finished.add(name)
        try:
            store.execute(f"{verb} PREPARED ?", (gid,), noresult=True)
        except Exception as error:
            if sqlstate(error) == _UNDEFINED_OBJECT:
                # Gone: settled already by recover(), which commits only what the
                # decider committed; or a PREPARE that never happened, rolled back.
                _reset(store)
                return
            _reset(store, lost=True)
            if _end_elsewhere(self.registry, name, gid, commit, self.preparing[name]):
                return
            if commit:
                raise CommitInDoubtError(
                    f"the transaction {self.gtrid} is committed, but the COMMIT PREPARED of "
                    f"the store {name!r} failed ({type(error).__name__}: "
                    f"{str(error).strip()}); its part stays prepared, holding its locks, "
                    "until middlestorm.twophase.recover() commits it"
                ) from error
            log.error("%s could not be rolled back now; recover() will", gid)
            return
        _reset(store)


def for_transaction(registry: StoreRegistry, txn: Any) -> Commit:
    """The commit of ``txn`` among ``registry``'s stores, made on first use."""
    commit: Commit | None = registry._txn_ids.get(txn)
    if commit is None:
        commit = registry._txn_ids[txn] = Commit(registry)
    return commit


def _backend_pid(store: Store) -> int:
    """The store's session's backend pid, as the client knows it (no round trip)."""
    raw = store._connection._raw_connection
    return int(raw.get_backend_pid()) if raw is not None else 0


def _reset(store: Store, *, lost: bool = False) -> None:
    """After a prepared transaction ended (or was left to recovery): a store ready for the next.

    The session is out of its transaction, which psycopg2 does not know: a
    ROLLBACK (a no-op for the server) tells it. A lost connection is closed
    without one, so that nothing prepared is touched; Storm reconnects.
    """
    connection = store._connection
    if lost:
        raw, connection._raw_connection = connection._raw_connection, None
        connection._state = STATE_RECONNECT
        if raw is not None:
            try:
                raw.close()
            except Exception:
                log.debug("closing a connection failed", exc_info=True)
    store.invalidate()
    try:
        store.rollback()
    except Exception:
        log.debug("resetting a store failed", exc_info=True)


def _connect(registry: StoreRegistry, name: str) -> Any:
    """A psycopg2 connection of its own to ``name``'s database (never a spare), autocommit.

    :raises DisconnectionError: when it cannot be opened.
    """
    try:
        raw = handoff.connect_fresh(registry.database(name))
    except Exception as error:
        raise DisconnectionError(str(error).strip()) from error
    raw.autocommit = True  # a new connection is outside any transaction
    return raw


@contextmanager
def _new_connection(registry: StoreRegistry, name: str) -> Iterator[Any]:
    """:func:`_connect`, closed at the end of the block."""
    raw = _connect(registry, name)
    try:
        yield raw
    finally:
        raw.close()


def _status(cursor: Any, xid: int) -> str | None:
    cursor.execute("SELECT pg_xact_status(%s::text::xid8)", (str(xid),))
    return cursor.fetchone()[0]


def _settle(
    registry: StoreRegistry, decider: str, xid: int, pid: int, *, end_session: bool = True
) -> bool | None:
    """The decider's outcome, from PostgreSQL: True committed, False rolled back.

    A transaction still in progress is the decider's session, whose client
    may be gone: with ``end_session``, that session (only if it still runs
    that transaction) is ended first, which settles it. None when the
    database cannot tell (unreachable, still in progress, or too old).
    """
    try:
        with _new_connection(registry, decider) as raw:
            cursor = raw.cursor()
            status = _status(cursor, xid)
            if status == "in progress" and end_session:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity "
                    "WHERE pid = %s AND backend_xid::text = (%s::bigint %% 4294967296)::text",
                    (TERMINATE_TIMEOUT_MS, pid, xid),
                )
                status = _status(cursor, xid)
    except Exception:
        log.exception("the outcome of transaction %s could not be read", xid)
        return None
    return {"committed": True, "aborted": False}.get(status or "")


def _end_elsewhere(registry: StoreRegistry, name: str, gid: str, commit: bool, pid: int) -> bool:
    """COMMIT or ROLLBACK PREPARED ``gid`` on a new connection; false if that failed.

    A PREPARE whose reply was lost may still be running in its old session:
    that session is ended first (only if it still runs that PREPARE).
    """
    verb = "COMMIT" if commit else "ROLLBACK"
    try:
        with _new_connection(registry, name) as raw:
            cursor = raw.cursor()
            cursor.execute(
                "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity "
                "WHERE pid = %s AND state = 'active' AND query LIKE %s",
                (TERMINATE_TIMEOUT_MS, pid, f"PREPARE TRANSACTION '{gid}'%"),
            )
            _end(cursor, verb, gid)
    except Exception:
        log.warning("%s PREPARED %s failed", verb, gid, exc_info=True)
        return False
    return True


def _end(cursor: Any, verb: str, gid: str) -> None:
    try:
        cursor.execute(f"{verb} PREPARED %s", (gid,))
    except Exception as error:
        if sqlstate(error) != _UNDEFINED_OBJECT:
            raise


# -- recovery ------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedBranch:
    """A part of a two-phase transaction left prepared in one of a registry's databases."""

    #: The store whose database holds it (the first, if several share one).
    store: str
    #: Its id in ``pg_prepared_xacts.gid``.
    gid: str
    #: The id its transaction's parts share (the gid without the store).
    gtrid: str
    #: The store that prepared it, and the store that decides its transaction.
    branch: str
    decider: str
    #: Seconds since it was prepared.
    age: float
    #: Whether this registry has the deciding store, so that recover() can settle it.
    resolvable: bool


@dataclass(frozen=True)
class Resolution:
    """What :func:`recover` did with one transaction."""

    gtrid: str
    #: ``"committed"``, ``"rolled back"``, or ``"undecided"`` (left as it was).
    outcome: Literal["committed", "rolled back", "undecided"]
    #: Its parts that were prepared when recovery began.
    branches: tuple[PreparedBranch, ...]
    #: Those still prepared afterwards.
    left: tuple[PreparedBranch, ...]
    #: Why it ended so.
    reason: str


class _Databases:
    """One autocommit connection per distinct database of a registry, for recovery."""

    def __init__(self, registry: StoreRegistry) -> None:
        self.registry = registry
        self.connections: dict[str, Any] = {}
        self.unreachable: dict[str, str] = {}
        seen: set[str] = set()
        for name in registry.names:
            uri = registry._default_uris[name]
            if uri in seen or not isinstance(registry.database(name), Postgres):
                continue
            seen.add(uri)
            try:
                self.connections[name] = _connect(registry, name)
            except DisconnectionError as error:
                self.unreachable[name] = str(error)

    def close(self) -> None:
        for raw in self.connections.values():
            try:
                raw.close()
            except Exception:
                log.debug("closing a connection failed", exc_info=True)

    def prepared(self) -> list[PreparedBranch]:
        """Every middlestorm transaction part prepared in the registry's databases."""
        uris = self.registry._default_uris
        branches: dict[str, PreparedBranch] = {}
        for name, raw in self.connections.items():
            cursor = raw.cursor()
            cursor.execute(
                "SELECT gid, extract(epoch FROM now() - prepared) FROM pg_prepared_xacts "
                "WHERE database = current_database() AND gid LIKE 'middlestorm:%' "
                "ORDER BY prepared"
            )
            for gid, age in cursor.fetchall():
                match = _GID.fullmatch(gid)
                if match is None or gid in branches:
                    continue
                decider = match["decider"]
                branches[gid] = PreparedBranch(
                    store=name,
                    gid=gid,
                    gtrid=gid.rsplit(":", 1)[0],
                    branch=match["branch"],
                    decider=decider,
                    age=float(age),
                    resolvable=decider in uris
                    and database_key(self.registry, decider) == match["key"],
                )
        return list(branches.values())


def in_doubt(registry: StoreRegistry) -> list[PreparedBranch]:
    """The parts of middlestorm transactions left prepared in the registry's databases.

    Those whose deciding store this registry lacks (another application's,
    or this one's before its stores changed) are listed with
    ``resolvable=False``: :func:`recover` leaves them alone.

    :raises DisconnectionError: when a database cannot be reached.
    """
    databases = _Databases(registry)
    try:
        if databases.unreachable:
            name, problem = next(iter(databases.unreachable.items()))
            raise DisconnectionError(f"the database of the store {name!r}: {problem}")
        return sorted(databases.prepared(), key=lambda branch: -branch.age)
    finally:
        databases.close()


def recover(registry: StoreRegistry, *, grace: float = 30.0) -> list[Resolution]:
    """Commit or roll back the transactions a crash left prepared, as their decider ended.

    Safe while the application runs. A decider still in progress is left
    alone while its parts are younger than ``grace`` seconds (it is most
    likely committing); after that its client is taken for gone, and its
    session is ended, which settles it. Run it when a process starts, or
    from a periodic job: a prepared transaction keeps its locks until settled.

    :returns: what was done, one :class:`Resolution` per transaction.
    """
    databases = _Databases(registry)
    try:
        groups: dict[str, list[PreparedBranch]] = {}
        for branch in databases.prepared():
            groups.setdefault(branch.gtrid, []).append(branch)
        return [_resolve(databases, tuple(group), grace) for group in groups.values()]
    finally:
        databases.close()


def _resolve(databases: _Databases, group: tuple[PreparedBranch, ...], grace: float) -> Resolution:
    first = group[0]
    if not first.resolvable:
        return Resolution(
            first.gtrid, "undecided", group, group,
            f"its deciding store {first.decider!r} is not one of this registry's "
            "(another application's, or this one's with other stores or URIs)",
        )  # fmt: skip
    match = _GID.fullmatch(first.gid)
    assert match is not None
    started = time.monotonic()
    commit = _settle(
        databases.registry,
        first.decider,
        int(match["xid"]),
        int(match["pid"]),
        end_session=min(branch.age for branch in group) >= grace,
    )
    if commit is None:
        return Resolution(
            first.gtrid, "undecided", group, group,
            f"the database of its deciding store {first.decider!r} could not tell its outcome "
            f"(unreachable, still committing within {grace:g} s, or too old to remember)",
        )  # fmt: skip
    verb = "COMMIT" if commit else "ROLLBACK"
    left, problems = [], []
    for branch in group:
        try:
            _end(databases.connections[branch.store].cursor(), verb, branch.gid)
        except Exception as error:
            left.append(branch)
            problems.append(f"{branch.branch}: {type(error).__name__}: {str(error).strip()}")
    outcome: Literal["committed", "rolled back"] = "committed" if commit else "rolled back"
    reason = f"its decider {'committed' if commit else 'never committed'}"
    if problems:
        reason += "; " + "; ".join(problems)
    log.warning(
        "two-phase transaction %s %s in %.3f s: %s",
        first.gtrid,
        outcome,
        time.monotonic() - started,
        reason,
    )
    return Resolution(first.gtrid, outcome, group, tuple(left), reason)
