"""Two-phase commit across a registry's PostgreSQL stores, and recovery after a crash.

With ``StoreRegistry(..., two_phase=True)``, a transaction that more than one
store joined commits in two phases, so that every database commits or none
does:

1. every store's transaction is prepared (``PREPARE TRANSACTION``); the first
   store to have joined, the *decider*, first writes the decision to commit
   into its own transaction (a row of ``middlestorm_twophase``);
2. the decider's transaction is committed: from then on the whole transaction
   is committed, whatever happens next; then the others' (``COMMIT PREPARED``).

A transaction only one store joined commits in one phase, as it would without
two-phase commit: no PREPARE, no decision row.

A crash between the phases (of the process, a database or the network) leaves
prepared transactions behind, holding their locks. :func:`recover` resolves
them: a transaction whose decider is still prepared is rolled back (nothing of
it was committed), one whose decision row exists is committed, and any other
is rolled back (its decider was rolled back). :func:`in_doubt` lists them.
Recovery only touches the transactions of a registry configured like the
one it is given (same store names and URIs): another application's prepared
transactions, even in the same databases, are left alone.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from uuid import uuid4

from storm.database import STATE_RECONNECT
from storm.databases.postgres import Postgres
from storm.exceptions import DisconnectionError
from storm.store import Store
from storm.xid import Xid

from middlestorm.errors import ConfigurationError

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = [
    "LOG_TABLE",
    "LOG_TABLE_SQL",
    "PreparedBranch",
    "Resolution",
    "in_doubt",
    "recover",
]

log = logging.getLogger(__name__)

#: The table, in each database of a two-phase registry, that records decisions to commit.
LOG_TABLE = "middlestorm_twophase"
#: The statement that makes it (middlestorm runs it when first needed).
LOG_TABLE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {LOG_TABLE} "
    "(gtrid text PRIMARY KEY, decided_at timestamptz NOT NULL DEFAULT now())"
)
#: How every middlestorm global transaction id begins.
GTRID_PREFIX = "ms2pc-"
#: The longest store name two-phase commit takes: an XA branch qualifier
#: holds 64 bytes, the role included.
MAX_NAME = 56
_DECIDER = "decider:"
_BRANCH = "branch:"
_UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a gid that is gone


def check_database(name: str, database: object) -> None:
    """Refuse a store two-phase commit cannot include.

    :raises ConfigurationError: for a database other than PostgreSQL, or a long name.
    """
    if not isinstance(database, Postgres):
        raise ConfigurationError(
            f"two-phase commit needs PostgreSQL, and the store {name!r} is "
            f"{type(database).__name__}: use a registry without two_phase for it"
        )
    if len(name.encode()) > MAX_NAME:
        raise ConfigurationError(
            f"two-phase commit takes store names of up to {MAX_NAME} bytes; "
            f"{name!r} is longer (it names the store's branch of each transaction)"
        )


def fingerprint(registry: StoreRegistry) -> str:
    """What tells this registry's transactions from other applications': its stores."""
    stores = "\n".join(f"{name}={uri}" for name, uri in sorted(registry._default_uris.items()))
    return hashlib.sha256(stores.encode()).hexdigest()[:8]


class Commit:
    """The two-phase commit of one transaction: its id, its branches, how far it got."""

    def __init__(self, registry: StoreRegistry) -> None:
        self.registry = registry
        self.gtrid = f"{GTRID_PREFIX}{fingerprint(registry)}-{uuid4().hex}"
        self.decider: str | None = None
        self.branches = 0
        self.finished = 0
        self.prepared = False
        #: Set once the decider committed: the transaction is committed.
        self.decided = False

    def begin(self, store: Store, name: str) -> None:
        """Begin ``store``'s branch; the first store to join decides."""
        if self.decider is None:
            self.decider = name
        self.branches += 1
        role = _DECIDER if name == self.decider else _BRANCH
        store.begin(Xid(0, self.gtrid, role + name))

    def sort_key(self, name: str) -> str:
        """The decider prepares and commits first (Storm sorts its TPC stores after others)."""
        return f"zz_{0 if name == self.decider else 1}_{name}"

    def vote(self, store: Store, name: str, txn: Any) -> None:
        """Prepare ``store``'s branch, unless it is the transaction's only participant."""
        if len(txn._resources) == 1:
            return  # one phase: psycopg2 commits a TPC transaction never prepared in one
        if name == self.decider:
            _ensure_log_table(self.registry, name)
            finished = _finished_decisions(self.registry).pop(name, None)
            if finished is not None:
                store.execute(
                    f"DELETE FROM {LOG_TABLE} WHERE gtrid = ?", (finished,), noresult=True
                )
            store.execute(
                f"INSERT INTO {LOG_TABLE} (gtrid) VALUES (?)", (self.gtrid,), noresult=True
            )
        store.prepare()
        self.prepared = True

    def finished_branch(self, name: str) -> None:
        """Note that ``name``'s branch committed."""
        if name == self.decider:
            self.decided = True
        self.finished += 1
        if self.prepared and self.finished == self.branches and self.decider is not None:
            # Every branch committed: the decision row can go, with the thread's next one.
            _finished_decisions(self.registry)[self.decider] = self.gtrid

    def settle(self, store: Store, name: str) -> None:
        """End a branch the transaction aborts: committed if the decider was, else rolled back.

        A prepared branch of a committed transaction is committed now if its
        connection allows, and otherwise left prepared for :func:`recover`.
        """
        if not (self.decided and self.prepared):
            store.rollback()
            return
        try:
            store.commit()
        except Exception:
            log.exception(
                "the transaction %s is committed, but the COMMIT PREPARED of the store %r "
                "failed: its branch stays prepared until middlestorm.twophase.recover() "
                "commits it",
                self.gtrid,
                name,
            )
            detach(store)
        else:
            self.finished_branch(name)


def for_transaction(registry: StoreRegistry, txn: Any) -> Commit:
    """The two-phase commit of ``txn`` among ``registry``'s stores, made on first use."""
    commit: Commit | None = registry._txn_ids.get(txn)
    if commit is None:
        commit = registry._txn_ids[txn] = Commit(registry)
    return commit


def _finished_decisions(registry: StoreRegistry) -> dict[str, str]:
    """Per thread: the decision row, per decider, of the thread's last completed commit."""
    local = registry._local.__dict__
    decisions: dict[str, str] | None = local.get("twophase_finished")
    if decisions is None:
        decisions = local["twophase_finished"] = {}
    return decisions


_ensure_lock = threading.Lock()


def _ensure_log_table(registry: StoreRegistry, name: str) -> None:
    """Make the decision table in ``name``'s database, once per registry and process."""
    ensured: set[str] = registry.__dict__.setdefault("_twophase_tables", set())
    if name in ensured:
        return
    with _ensure_lock:
        if name in ensured:
            return
        with _raw_connection(registry, name) as raw:
            cursor = raw.cursor()
            if not _has_log_table(cursor):
                try:
                    cursor.execute(LOG_TABLE_SQL)
                except Exception as error:
                    if not _has_log_table(cursor):  # another process may have made it
                        raise ConfigurationError(
                            f"two-phase commit records its decisions in a table {LOG_TABLE} "
                            f"in the database of the store {name!r}, which could not be "
                            f"created ({type(error).__name__}: {str(error).strip()}); "
                            f"create it there: {LOG_TABLE_SQL}"
                        ) from error
        ensured.add(name)


def _has_log_table(cursor: Any) -> bool:
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (LOG_TABLE,))
    return bool(cursor.fetchone()[0])


@contextmanager
def _raw_connection(registry: StoreRegistry, name: str) -> Iterator[Any]:
    """A psycopg2 connection of its own to ``name``'s database, in autocommit mode."""
    database = registry.database(name)
    try:
        raw = database.raw_connect()
    except Exception as error:
        raise DisconnectionError(str(error).strip()) from error
    try:
        raw.autocommit = True
        yield raw
    finally:
        raw.close()


def detach(store: Store) -> None:
    """Drop a store's connection without ending its prepared transaction.

    The prepared transaction outlives the session; closing the session (rather
    than rolling back, as Storm would) leaves it for :func:`recover`.
    """
    connection = store._connection
    raw, connection._raw_connection = connection._raw_connection, None
    connection._two_phase_transaction = False
    connection._state = STATE_RECONNECT
    if raw is not None:
        try:
            raw.close()
        except Exception:
            log.debug("closing a connection failed", exc_info=True)
    store.rollback()  # forgets the store's pending changes; sends nothing


# -- recovery ------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedBranch:
    """A branch of a two-phase transaction left prepared in one of a registry's databases."""

    #: The store whose database holds it (the first, if several share one).
    store: str
    #: The global transaction id its branches share.
    gtrid: str
    #: ``decider:<store>`` or ``branch:<store>``: the store that prepared it.
    branch: str
    #: Its id in ``pg_prepared_xacts.gid``.
    gid: str
    #: Seconds since it was prepared.
    age: float

    @property
    def decides(self) -> bool:
        """Whether this is the branch whose commit commits the transaction."""
        return self.branch.startswith(_DECIDER)


@dataclass(frozen=True)
class Resolution:
    """What :func:`recover` did with one transaction."""

    gtrid: str
    #: ``"committed"``, ``"rolled back"``, or ``"undecided"`` (left as it was).
    outcome: Literal["committed", "rolled back", "undecided"]
    #: Its branches that were prepared when recovery began.
    branches: tuple[PreparedBranch, ...]
    #: Those still prepared afterwards (they failed to resolve, or were left alone).
    left: tuple[PreparedBranch, ...]
    #: Why it ended so.
    reason: str


class _Databases:
    """One autocommit connection per distinct database of a registry, for recovery."""

    def __init__(self, registry: StoreRegistry) -> None:
        self.prefix = f"{GTRID_PREFIX}{fingerprint(registry)}-"
        self.connections: dict[str, Any] = {}
        self.unreachable: dict[str, str] = {}
        seen: set[str] = set()
        for name in registry.names:
            uri = registry._default_uris[name]
            if uri in seen or not isinstance(registry.database(name), Postgres):
                continue
            seen.add(uri)
            try:
                raw = registry.database(name).raw_connect()
                raw.autocommit = True
            except Exception as error:
                self.unreachable[name] = f"{type(error).__name__}: {str(error).strip()}"
            else:
                self.connections[name] = raw

    def close(self) -> None:
        for raw in self.connections.values():
            try:
                raw.close()
            except Exception:
                log.debug("closing a connection failed", exc_info=True)

    def _query(self, name: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        cursor = self.connections[name].cursor()
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []

    def prepared(self) -> list[PreparedBranch]:
        from psycopg2.extensions import Xid as RawXid

        branches = []
        for name in self.connections:
            rows = self._query(
                name,
                "SELECT gid, extract(epoch FROM now() - prepared) FROM pg_prepared_xacts "
                "WHERE database = current_database() ORDER BY prepared",
            )
            for gid, age in rows:
                xid = RawXid.from_string(gid)
                if xid.format_id == 0 and (xid.gtrid or "").startswith(self.prefix):
                    branches.append(PreparedBranch(name, xid.gtrid, xid.bqual, gid, float(age)))
        return branches

    def decisions(self, gtrid: str | None = None) -> dict[str, list[tuple[str, float]]]:
        """Per database with a decision table: its rows (all of ours, or ``gtrid``'s)."""
        found = {}
        for name in self.connections:
            if not self._query(name, "SELECT to_regclass(%s) IS NOT NULL", LOG_TABLE)[0][0]:
                continue
            rows = self._query(
                name,
                f"SELECT gtrid, extract(epoch FROM now() - decided_at) FROM {LOG_TABLE} "
                "WHERE gtrid LIKE %s AND (%s IS NULL OR gtrid = %s)",
                self.prefix + "%",
                gtrid,
                gtrid,
            )
            found[name] = [(row[0], float(row[1])) for row in rows]
        return found

    def finish(self, branch: PreparedBranch, commit: bool) -> bool:
        """COMMIT or ROLLBACK PREPARED; False when the branch was already gone."""
        verb = "COMMIT" if commit else "ROLLBACK"
        try:
            self._query(branch.store, f"{verb} PREPARED %s", branch.gid)
        except Exception as error:
            if getattr(error, "pgcode", None) == _UNDEFINED_OBJECT:
                return False
            raise
        return True


def in_doubt(registry: StoreRegistry) -> list[PreparedBranch]:
    """The branches of ``registry``'s transactions left prepared, oldest first.

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


def recover(registry: StoreRegistry, *, older_than: float = 60.0) -> list[Resolution]:
    """Commit or roll back ``registry``'s transactions left prepared by a crash.

    Run it when a process of the application starts, or from a periodic job:
    a prepared transaction keeps its locks until it is resolved.

    :param older_than: leave alone transactions prepared less than this many
        seconds ago, which may still be committing. ``0`` takes them all:
        only when no process of the application is running.
    :returns: what was done, one :class:`Resolution` per transaction.
    """
    if older_than < 0:
        raise ValueError(f"older_than must be 0 or more seconds, not {older_than!r}")
    databases = _Databases(registry)
    try:
        branches = databases.prepared()
        groups: dict[str, list[PreparedBranch]] = {}
        for branch in branches:
            groups.setdefault(branch.gtrid, []).append(branch)
        resolutions = [
            _resolve(databases, gtrid, tuple(group), older_than) for gtrid, group in groups.items()
        ]
        if not databases.unreachable:
            _forget_decisions(databases, older_than, {r.gtrid for r in resolutions if r.left})
        return resolutions
    finally:
        databases.close()


def _resolve(
    databases: _Databases, gtrid: str, group: tuple[PreparedBranch, ...], older_than: float
) -> Resolution:
    if any(branch.age < older_than for branch in group):
        return Resolution(
            gtrid, "undecided", group, group,
            f"prepared less than {older_than:g} s ago: it may still be committing",
        )  # fmt: skip
    others = [branch for branch in group if not branch.decides]
    commit: bool | None = None
    reason = ""
    decider = next((branch for branch in group if branch.decides), None)
    if decider is not None:
        try:
            if databases.finish(decider, commit=False):
                commit, reason = False, "its decider was still prepared: nothing had committed"
        except Exception as error:
            return Resolution(
                gtrid, "undecided", group, group,
                f"rolling back its decider failed: {type(error).__name__}: {str(error).strip()}",
            )  # fmt: skip
    if commit is None:
        if any(databases.decisions(gtrid).values()):
            commit, reason = True, "its decision to commit is recorded"
        elif databases.unreachable:
            names = ", ".join(repr(name) for name in databases.unreachable)
            return Resolution(
                gtrid, "undecided", group, group,
                f"no decision found, but the databases of {names} could not be reached",
            )  # fmt: skip
        else:
            commit, reason = False, "no decision to commit is recorded: its decider rolled back"
    left = []
    for branch in others:
        try:
            databases.finish(branch, commit)
        except Exception as error:
            left.append(branch)
            reason += f"; {branch.branch}: {type(error).__name__}: {str(error).strip()}"
    if commit and not left:
        for name in databases.connections:
            if databases._query(name, "SELECT to_regclass(%s) IS NOT NULL", LOG_TABLE)[0][0]:
                databases._query(name, f"DELETE FROM {LOG_TABLE} WHERE gtrid = %s", gtrid)
    outcome: Literal["committed", "rolled back"] = "committed" if commit else "rolled back"
    log.warning("two-phase transaction %s %s: %s", gtrid, outcome, reason)
    return Resolution(gtrid, outcome, group, tuple(left), reason)


def _forget_decisions(databases: _Databases, older_than: float, unresolved: set[str]) -> None:
    """Delete decision rows whose branches are all committed.

    A row is written by its decider's transaction, which commits after every
    branch was prepared; so a row with no branch prepared anywhere is done with.
    """
    still_prepared = {branch.gtrid for branch in databases.prepared()} | unresolved
    for name, rows in databases.decisions().items():
        for gtrid, age in rows:
            if gtrid not in still_prepared and age >= older_than:
                databases._query(name, f"DELETE FROM {LOG_TABLE} WHERE gtrid = %s", gtrid)
