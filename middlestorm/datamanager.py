"""How a registry's store joins the Zope transaction: Storm's data manager, completed.

Storm's ``StoreDataManager`` (``storm.zope.zstorm``) commits and aborts a
store with the transaction. This one adds what the transaction machinery and
a retry policy need to know:

* ``should_retry(error)``, so ``transaction.manager.attempts()`` and
  ``run()`` retry the failures :func:`middlestorm.retry.classify` calls
  transient, as zope.sqlalchemy's data manager does;
* a COMMIT whose connection was lost, or that failed after another store of
  the transaction had committed, raises :class:`CommitInDoubtError`: its
  outcome is unknown, and the work must not be run again;
* after a failed COMMIT the connection is left ready for the rollback that
  follows, so it can be reused (Storm's SQLite connection forgets that
  SQLite kept the transaction open, and its next BEGIN would fail);
* in a two-phase registry, a transaction several stores wrote in commits as
  :mod:`middlestorm.twophase` says: all but the decider prepare in
  ``tpc_vote``, and none is rolled back once the decider committed.
"""

from __future__ import annotations

import itertools
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from storm.exceptions import DisconnectionError
from storm.store import PENDING_ADD, PENDING_REMOVE, Store
from storm.tracer import install_tracer
from storm.zope.zstorm import StoreDataManager as StormDataManager

from middlestorm import routes, timeouts, twophase, work
from middlestorm.errors import CommitInDoubtError, WrongThreadError
from middlestorm.lifecycle import COMMITTED_STORES
from middlestorm.retry import Verdict, classify

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["StoreDataManager", "hook", "unhook"]

#: True while a data manager commits its store: that commit is the transaction's own.
_finishing: ContextVar[bool] = ContextVar("middlestorm.finishing", default=False)


class _CommitTracer:
    """A Storm tracer that tells the unit of work when an app commits a store itself."""

    def connection_commit(self, connection: Any, xid: Any = None) -> None:
        if not _finishing.get():
            work.note_commit()

    def connection_raw_execute_success(
        self, connection: Any, raw_cursor: Any, statement: str, params: Any
    ) -> None:
        # Storm's SQLite connection commits with a COMMIT statement, not connection_commit.
        if statement == "COMMIT" and not _finishing.get():
            work.note_commit()


install_tracer(_CommitTracer())


def hook(store: Store, registry: StoreRegistry) -> None:
    """Have ``store`` join the registry's current transaction when it is next used."""
    store._event.hook("register-transaction", _join, weakref.ref(registry))


def unhook(store: Store, registry: StoreRegistry) -> None:
    """Undo :func:`hook`."""
    store._event.unhook("register-transaction", _join, weakref.ref(registry))


def _join(store: Store, registry_ref: weakref.ref[StoreRegistry]) -> bool:
    """Join the store to the transaction (Storm's ``register_store_with_transaction``)."""
    registry = registry_ref()
    if registry is None:
        return False
    if id(store) not in registry._stores:  # the registry's stores of the calling thread
        raise WrongThreadError.for_store(f"a store of {registry!r}")
    txn = registry.transaction_manager.get()
    manager = StoreDataManager(store, registry)
    txn.join(manager)
    if registry.two_phase:
        manager.name = registry.get_name(store)
        manager.two_phase = twophase.for_transaction(registry, txn)
        manager.two_phase.members[manager.name] = store
    timeouts.apply(store)
    routes.apply(store, registry.transaction_manager)
    return False  # joined once per transaction: hooked again when it ends


class StoreDataManager(StormDataManager):
    """Storm's data manager for one store in one transaction, with retry and in-doubt errors.

    In a two-phase registry, :mod:`middlestorm.twophase` decides how a store
    votes, commits and aborts.
    """

    #: The transaction's two-phase commit, in a two-phase registry.
    two_phase: twophase.Commit | None = None
    #: The store's name in its registry (two-phase registries only).
    name = ""

    def abort(self, txn: Any) -> None:
        try:
            if self.two_phase is None:
                self._store.rollback()
            else:
                self.two_phase.settle(self._store, self.name)
        finally:
            self._hook_register_transaction_event()

    def commit(self, txn: Any) -> None:
        """Nothing: stores write in ``tpc_begin`` (a flush) and prepare in ``tpc_vote``."""

    def tpc_vote(self, txn: Any) -> None:
        if self.two_phase is not None:
            token = _finishing.set(True)  # a store that only read commits here
            try:
                self.two_phase.vote()
            finally:
                _finishing.reset(token)

    def tpc_abort(self, txn: Any) -> None:
        self.abort(txn)

    def sortKey(self) -> str:
        if self.two_phase is None:
            return str(super().sortKey())
        return self.two_phase.sort_key(self.name)

    def _hook_register_transaction_event(self) -> None:
        if self._store._register_for_txn:
            hook(self._store, self._zstorm)

    def tpc_finish(self, txn: Any) -> None:
        committed_before = txn.extension.get(COMMITTED_STORES, 0)
        token = _finishing.set(True)
        committed = True
        try:
            if self.two_phase is None:
                self._store.commit()
            else:
                committed = self.two_phase.finish(self._store, self.name, self._store.commit)
        except CommitInDoubtError:
            raise
        except Exception as error:
            # A two-phase transaction found rolled back (CommitRolledBack) may be
            # run again, unless something else of it committed, as below.
            if isinstance(error, DisconnectionError):
                raise CommitInDoubtError(
                    "the connection was lost during the COMMIT: the database may or may not "
                    "have committed this transaction, so it is not run again"
                ) from error
            _keep_sqlite_transaction(self._store)
            if committed_before:
                raise CommitInDoubtError(
                    f"a COMMIT failed after {committed_before} other store(s) of the same "
                    "transaction had committed: their changes stay committed"
                ) from error
            foreign = [r for r in txn._resources if not isinstance(r, StoreDataManager)]
            if foreign:
                raise CommitInDoubtError(
                    f"a COMMIT failed in a transaction with other data managers ({foreign!r}), "
                    "which may have committed already"
                ) from error
            raise
        finally:
            _finishing.reset(token)
        if committed:  # not a store that only read, settled at the vote
            txn.extension[COMMITTED_STORES] = committed_before + 1
            work.note_commit()
        self._hook_register_transaction_event()

    def savepoint(self) -> StoreSavepoint:
        """A savepoint of the store's transaction (``transaction.savepoint()``)."""
        return StoreSavepoint(self._store)

    def should_retry(self, error: BaseException) -> bool:
        """Whether ``error`` ended an attempt that may be run again (``transaction``'s API)."""
        return classify(error) is Verdict.TRANSIENT


class StoreSavepoint:
    """``SAVEPOINT`` in a store's transaction; :meth:`rollback` returns to it.

    Changes made before it are flushed first, so the database holds them.
    Rolling back discards the store's unflushed changes and invalidates its
    cached objects, so that each is read again from the database: an object
    added after the savepoint is gone, one changed after it has its earlier
    values again.
    """

    _names = itertools.count(1)

    def __init__(self, store: Store) -> None:
        self.store = store
        self.name = f"middlestorm_{next(self._names)}"
        store.execute(f"SAVEPOINT {self.name}", noresult=True)

    def rollback(self) -> None:
        store = self.store
        _forget_changes(store)
        store.invalidate()
        store.execute(f"ROLLBACK TO SAVEPOINT {self.name}", noresult=True)


def _forget_changes(store: Store) -> None:
    """Drop a store's changes not yet flushed (the first part of Storm's ``Store.rollback``)."""
    for obj_info in store._dirty:
        pending = obj_info.pop("pending", None)
        if pending is PENDING_ADD:
            del obj_info["store"]
        elif pending is PENDING_REMOVE:
            store._enable_lazy_resolving(obj_info)
    store._dirty.clear()


def _keep_sqlite_transaction(store: Store) -> None:
    """After a failed COMMIT, let Storm's SQLite connection know SQLite is still in a transaction.

    Storm marks the transaction ended before it sends COMMIT and, unless the
    database was locked, leaves it so when the COMMIT fails; SQLite keeps the
    transaction open (a deferred foreign key, say), so Storm's rollback would
    send nothing and its next BEGIN would fail.
    """
    connection = store._connection
    raw = getattr(connection, "_raw_connection", None)
    if hasattr(connection, "_in_transaction") and getattr(raw, "in_transaction", False):
        connection._in_transaction = True
