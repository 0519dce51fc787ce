"""Two-phase commit across a registry's PostgreSQL stores, and recovery after a crash.

With ``StoreRegistry(..., two_phase=True)``, a transaction that more than one
store joined commits so that every database commits or none does:

1. the first store in name order, the *decider*, writes the decision to
   commit into its own transaction (a row of ``middlestorm_twophase``);
2. every other store's transaction is prepared (``PREPARE TRANSACTION``);
3. the decider's transaction is committed, in one phase: from then on the
   whole transaction is committed, whatever happens next;
4. the others are committed (``COMMIT PREPARED``).

A transaction only one store joined commits in one phase, as it would
without two-phase commit.

When the decider's COMMIT may or may not have happened (its connection was
lost), the outcome is settled at once, on a connection of its own: a
decision row marked rolled back is written unless the decider's is there;
the unique key makes whichever came first win. :func:`recover` settles, the
same way, transactions a crash left prepared, so it never guesses from the
age of a transaction, and may run while the application runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
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
from transaction.interfaces import TransientError

from middlestorm.errors import CommitInDoubtError, ConfigurationError, MiddleStormError

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = [
    "LOG_TABLE",
    "LOG_TABLE_SQL",
    "CommitRolledBack",
    "PreparedBranch",
    "Resolution",
    "in_doubt",
    "recover",
]

log = logging.getLogger(__name__)

#: The table, in the deciding store's database, that records decisions.
LOG_TABLE = "middlestorm_twophase"
#: The statement that makes it (middlestorm runs it when first needed).
LOG_TABLE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {LOG_TABLE} (gtrid text PRIMARY KEY, "
    "committed boolean NOT NULL, decided_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
#: How every prepared transaction of middlestorm's is named.
PREFIX = "middlestorm:"
#: The store names two-phase commit takes: they name the prepared transactions.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GID = re.compile(
    r"middlestorm:(?P<id>[0-9a-f]{32}):(?P<key>[0-9a-f]{8}):"
    r"(?P<decider>[A-Za-z0-9_.-]{1,64}):(?P<branch>[A-Za-z0-9_.-]{1,64})"
)
_UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a transaction that is gone
#: How long settling an outcome waits for a decider still committing.
LOCK_TIMEOUT = "10s"


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
    """The two-phase commit of one transaction: its decider, what is prepared, the outcome."""

    def __init__(self, registry: StoreRegistry) -> None:
        self.registry = registry
        self.id = uuid4().hex
        #: The registry's stores that joined the transaction.
        self.participants = 0
        self.decider: str | None = None
        self.gtrid = ""
        #: Stores whose PREPARE was sent (it may have happened even if it failed).
        self.preparing: set[str] = set()
        #: Stores committed (or rolled back) and done with.
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

    def vote(self, store: Store, name: str, txn: Any) -> None:
        """Record the decision (the decider) or prepare (the others); nothing in one phase."""
        if len(txn._resources) == 1:
            return
        if self.decider is None:  # the first store to vote decides
            self.decider = name
            self.gtrid = f"{PREFIX}{self.id}:{database_key(self.registry, name)}:{name}"
            _ensure_log_table(self.registry, name)
            finished = _finished_decisions(self.registry).pop(name, None)
            if finished is not None:
                store.execute(f"DELETE FROM {LOG_TABLE} WHERE gtrid = ?", (finished,))
            store.execute(
                f"INSERT INTO {LOG_TABLE} (gtrid, committed) VALUES (?, true)",
                (self.gtrid,),
                noresult=True,
            )
            return
        self.preparing.add(name)
        store.execute("PREPARE TRANSACTION ?", (self.gid(name),), noresult=True)

    def finish(self, store: Store, name: str, commit_store: Any) -> None:
        """Commit ``store``'s part: the decider's COMMIT, or a COMMIT PREPARED.

        ``commit_store()`` commits the decider as a one-phase store is.

        :raises: what the decider's COMMIT raised, unless its outcome could be
            settled as committed; for another store, only when its prepared
            transaction cannot be committed now.
        """
        if name not in self.preparing:
            if name == self.decider:
                self._finish_decider(commit_store)
            else:
                commit_store()  # one phase
            self.finished.add(name)
        else:
            self._end_prepared(store, name, commit=True)
        if self.decider is not None and self.decided and len(self.finished) == self.participants:
            # Every part committed: the decision row can go, with the thread's next one.
            _finished_decisions(self.registry)[self.decider] = self.gtrid

    def _finish_decider(self, commit_store: Any) -> None:
        self.deciding = True
        try:
            commit_store()
        except DisconnectionError as error:
            self.decided = _settle(self.registry, self.decider or "", self.gtrid)
            if self.decided:
                log.warning(
                    "the connection was lost during the COMMIT of %s; the decision to "
                    "commit is recorded, so the transaction is committed",
                    self.gtrid,
                )
                return
            if self.decided is False:
                raise CommitRolledBack(
                    f"the connection was lost during the COMMIT of {self.gtrid}, which was "
                    "found rolled back: nothing of it was committed"
                ) from error
            raise CommitInDoubtError(
                f"the connection was lost during the COMMIT of {self.gtrid}, and its outcome "
                "could not be settled: its other parts stay prepared until "
                "middlestorm.twophase.recover() settles them"
            ) from error
        except Exception:
            self.decided = False
            raise
        self.decided = True

    def settle(self, store: Store, name: str) -> None:
        """End the part of a store the transaction aborts, as the decision says.

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
            if _pgcode(error) == _UNDEFINED_OBJECT:  # settled already, by recover()
                _reset(store)
                return
            _reset(store, lost=True)
            if _end_elsewhere(self.registry, name, gid, commit):
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


def _pgcode(error: BaseException) -> str | None:
    while error is not None:
        code = getattr(error, "pgcode", None) or getattr(error, "_pgcode", None)
        if code:
            return str(code)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return None


_ensure_lock = threading.Lock()


def _ensure_log_table(registry: StoreRegistry, name: str) -> None:
    """Make the decision table in ``name``'s database, once per registry and process."""
    ensured: set[str] = registry.__dict__.setdefault("_twophase_tables", set())
    if name in ensured:
        return
    with _ensure_lock:
        if name not in ensured:
            with _raw_connection(registry, name) as raw:
                _make_log_table(raw.cursor(), name)
            ensured.add(name)


def _make_log_table(cursor: Any, name: str) -> None:
    if _has_log_table(cursor):
        return
    try:
        cursor.execute(LOG_TABLE_SQL)
    except Exception as error:
        if not _has_log_table(cursor):  # another process may have made it meanwhile
            raise ConfigurationError(
                f"two-phase commit records its decisions in a table {LOG_TABLE} in the "
                f"database of the store {name!r}, which could not be created "
                f"({type(error).__name__}: {str(error).strip()}); create it there: "
                f"{LOG_TABLE_SQL}"
            ) from error


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


def _settle(registry: StoreRegistry, decider: str, gtrid: str) -> bool | None:
    """The outcome of ``gtrid``, fixed for good: True committed, False rolled back.

    Writes a decision to roll back unless the decider's decision to commit is
    there; if the decider's transaction is still open, the INSERT waits for it
    (up to :data:`LOCK_TIMEOUT`). None when the database cannot tell.
    """
    try:
        with _raw_connection(registry, decider) as raw:
            cursor = raw.cursor()
            cursor.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
            _make_log_table(cursor, decider)
            cursor.execute(
                f"INSERT INTO {LOG_TABLE} (gtrid, committed) VALUES (%s, false) "
                "ON CONFLICT (gtrid) DO NOTHING",
                (gtrid,),
            )
            cursor.execute(f"SELECT committed FROM {LOG_TABLE} WHERE gtrid = %s", (gtrid,))
            return bool(cursor.fetchone()[0])
    except Exception:
        log.exception("the outcome of %s could not be settled", gtrid)
        return None


def _end_elsewhere(registry: StoreRegistry, name: str, gid: str, commit: bool) -> bool:
    """COMMIT or ROLLBACK PREPARED ``gid`` on a new connection; false if that failed."""
    verb = "COMMIT" if commit else "ROLLBACK"
    try:
        with _raw_connection(registry, name) as raw:
            _end(raw.cursor(), verb, gid)
    except Exception:
        log.warning("%s PREPARED %s failed", verb, gid, exc_info=True)
        return False
    return True


def _end(cursor: Any, verb: str, gid: str) -> None:
    try:
        cursor.execute(f"{verb} PREPARED %s", (gid,))
    except Exception as error:
        if _pgcode(error) != _UNDEFINED_OBJECT:
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

    def query(self, name: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        cursor = self.connections[name].cursor()
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []

    def connection_of(self, name: str) -> str | None:
        """The connection (named for the first store on it) to the database of store ``name``."""
        uris = self.registry._default_uris
        return next((key for key in self.connections if uris[key] == uris[name]), None)

    def decider_of(self, decider: str, key: str) -> str | None:
        """The registry's store that decides a transaction, if it has it."""
        uris = self.registry._default_uris
        if decider in uris and database_key(self.registry, decider) == key:
            return decider
        return None

    def prepared(self) -> list[PreparedBranch]:
        """Every middlestorm transaction part prepared in the registry's databases."""
        branches: dict[str, PreparedBranch] = {}
        for name in self.connections:
            rows = self.query(
                name,
                "SELECT gid, extract(epoch FROM now() - prepared) FROM pg_prepared_xacts "
                "WHERE database = current_database() AND gid LIKE 'middlestorm:%%' "
                "ORDER BY prepared",
            )
            for gid, age in rows:
                match = _GID.fullmatch(gid)
                if match is None or gid in branches:
                    continue
                decider = self.decider_of(match["decider"], match["key"])
                branches[gid] = PreparedBranch(
                    store=name,
                    gid=gid,
                    gtrid=gid.rsplit(":", 1)[0],
                    branch=match["branch"],
                    decider=match["decider"],
                    age=float(age),
                    resolvable=decider is not None,
                )
        return list(branches.values())

    def decisions(self) -> dict[str, list[str]]:
        """Per database with a decision table: the transactions it decided."""
        found = {}
        for name in self.connections:
            if self.query(name, "SELECT to_regclass(%s) IS NOT NULL", LOG_TABLE)[0][0]:
                rows = self.query(name, f"SELECT gtrid FROM {LOG_TABLE}")
                found[name] = [gtrid for (gtrid,) in rows]
        return found


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


def recover(registry: StoreRegistry) -> list[Resolution]:
    """Commit or roll back the transactions a crash left prepared, as their decider decided.

    Safe while the application runs: a transaction still committing is
    waited for, never guessed at. Run it when a process starts, or from a
    periodic job: a prepared transaction keeps its locks until it is settled.

    :returns: what was done, one :class:`Resolution` per transaction.
    """
    databases = _Databases(registry)
    try:
        # Decisions first: a decision visible now was made after all its parts
        # were prepared, so the listing below shows any still prepared.
        decisions = databases.decisions()
        groups: dict[str, list[PreparedBranch]] = {}
        for branch in databases.prepared():
            groups.setdefault(branch.gtrid, []).append(branch)
        resolutions = [_resolve(databases, tuple(group)) for group in groups.values()]
        if not databases.unreachable:
            for name, gtrids in decisions.items():
                for gtrid in gtrids:
                    if gtrid not in groups:
                        databases.query(name, f"DELETE FROM {LOG_TABLE} WHERE gtrid = %s", gtrid)
        return resolutions
    finally:
        databases.close()


def _resolve(databases: _Databases, group: tuple[PreparedBranch, ...]) -> Resolution:
    first = group[0]
    if not first.resolvable:
        return Resolution(
            first.gtrid, "undecided", group, group,
            f"its deciding store {first.decider!r} is not one of this registry's "
            "(another application's, or this one's with other stores or URIs)",
        )  # fmt: skip
    commit = _settle(databases.registry, first.decider, first.gtrid)
    if commit is None:
        return Resolution(
            first.gtrid, "undecided", group, group,
            f"the database of its deciding store {first.decider!r} could not settle it",
        )  # fmt: skip
    verb = "COMMIT" if commit else "ROLLBACK"
    left = []
    problems = []
    for branch in group:
        try:
            _end(databases.connections[branch.store].cursor(), verb, branch.gid)
        except Exception as error:
            left.append(branch)
            problems.append(f"{branch.branch}: {type(error).__name__}: {str(error).strip()}")
    decider = databases.connection_of(first.decider)
    if not left and not databases.unreachable and decider is not None:
        databases.query(decider, f"DELETE FROM {LOG_TABLE} WHERE gtrid = %s", first.gtrid)
    outcome: Literal["committed", "rolled back"] = "committed" if commit else "rolled back"
    reason = (
        "its decider committed: the decision to commit is recorded"
        if commit
        else "its decider never committed: the decision to roll back is recorded"
    )
    if databases.unreachable:
        reason += "; some databases could not be reached: parts there are settled by a later run"
    if problems:
        reason += "; " + "; ".join(problems)
    log.warning("two-phase transaction %s %s: %s", first.gtrid, outcome, reason)
    return Resolution(first.gtrid, outcome, group, tuple(left), reason)
