"""The store registry: one Storm store per thread per name, built on ZStorm.

A :class:`StoreRegistry` is a ``storm.zope.zstorm.ZStorm`` of its own (so two
registries in one process never share stores or a transaction manager) that
adds what a multithreaded server needs:

* stores are created on first use in a thread and reused by that thread;
* a store's connection is closed when its thread ends;
* a forked child never touches a connection its parent opened, nor a
  transaction its parent had under way;
* a store used from another thread raises :class:`WrongThreadError`.

It needs no WSGI: worker threads can use the same registry as the middleware.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import transaction
from storm.database import STATE_DISCONNECTED, Database
from storm.databases.sqlite import SQLite
from storm.exceptions import DatabaseError as StormDatabaseError
from storm.exceptions import DisconnectionError
from storm.store import Store
from storm.zope.zstorm import ZStorm, register_store_with_transaction
from transaction.interfaces import ITransaction, ITransactionManager

from middlestorm import datamanager, handoff, twophase, work
from middlestorm.databases import DatabaseSpec, open_database, redact_uri
from middlestorm.errors import ConfigurationError, UnknownStoreError, WrongThreadError
from middlestorm.handles import ThreadStores
from middlestorm.lifecycle import thread_manager

__all__ = ["DEFAULT_STORE", "StoreRegistry"]

log = logging.getLogger(__name__)

#: The name of the store a registry hands out when no name is given.
DEFAULT_STORE = "main"

_registries: weakref.WeakSet[StoreRegistry] = weakref.WeakSet()


class StoreRegistry(ZStorm):
    """Named Storm databases, and one store per thread for each of them.

    >>> registry = StoreRegistry({"main": "sqlite:"})   # an in-memory SQLite database
    >>> store = registry.get()          # this thread's "main" store
    >>> store is registry.get("main")   # reused within the thread
    True

    :param databases: store names mapped to a Storm ``Database`` or a URI.
    :param default: the name :meth:`get` uses when given none; the first
        name in ``databases`` unless given.
    :param transaction_manager: the manager stores join; it must be
        thread-local: ``transaction.manager`` (the default) or a
        ``transaction.ThreadTransactionManager()`` of the registry's own.
    :param two_phase: commit a transaction in which several stores wrote
        with two-phase commit, so that all of them commit or none does
        (:mod:`middlestorm.twophase`; PostgreSQL 13 or later only, with
        ``max_prepared_transactions`` set).
    :param spare_connections: how many PostgreSQL connections of ended
        threads are kept, per database, for new threads to take
        (:mod:`middlestorm.handoff`); 0 closes each with its thread.
    :param spare_timeout: seconds a spare connection is kept before it is closed.
    :raises ConfigurationError: for a ``transaction.TransactionManager``,
        whose one transaction every thread would share; with ``two_phase``,
        for a database other than PostgreSQL.
    """

    _local: threading.local

    def __init__(
        self,
        databases: Mapping[str, DatabaseSpec],
        *,
        default: str | None = None,
        transaction_manager: ITransactionManager | None = None,
        two_phase: bool = False,
        spare_connections: int = 8,
        spare_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.two_phase = two_phase
        if (
            not isinstance(spare_connections, int)
            or isinstance(spare_connections, bool)
            or spare_connections < 0
        ):
            raise ConfigurationError(
                f"spare_connections must be a whole number >= 0, not {spare_connections!r}"
            )
        if (
            not isinstance(spare_timeout, (int, float))
            or isinstance(spare_timeout, bool)
            or not 0 < spare_timeout < float("inf")
        ):
            raise ConfigurationError(
                f"spare_timeout must be a number of seconds > 0, not {spare_timeout!r}"
            )
        #: Whether a thread has served two requests: threads are pooled, not one a request.
        self._pooled = False
        #: Whether a thread ended after serving one request: threads may be one a request.
        self._short_threads = False
        self.spare_connections = spare_connections
        self.spare_timeout = float(spare_timeout)
        # ZStorm caches databases in a class attribute, shared by every
        # instance; each registry keeps its own.
        self._databases: dict[str, Database] = {}
        _check_thread_local(transaction_manager)
        self.transaction_manager = (
            transaction.manager if transaction_manager is None else transaction_manager
        )
        if not databases:
            raise ConfigurationError("a StoreRegistry needs at least one database")
        for name, spec in databases.items():
            self._set_database(name, spec)
        self.default_name = next(iter(databases)) if default is None else default
        self._check_name(self.default_name)
        _registries.add(self)

    def __repr__(self) -> str:
        stores = ", ".join(f"{name}={uri!r}" for name, uri in self._default_uris.items())
        return f"<{type(self).__name__} {stores}>"

    @property
    def names(self) -> list[str]:
        """The configured store names, the default first."""
        return [self.default_name] + [n for n in self._default_uris if n != self.default_name]

    def thread_stores(self) -> ThreadStores:
        """The calling thread's stores by name, which refuse other threads (one per thread)."""
        try:
            return self._local.handles
        except AttributeError:
            handles = self._local.handles = ThreadStores(self)
            return handles

    def request_ended(self, handles: ThreadStores) -> None:
        """A WSGI request of the calling thread ended, and its transaction.

        Once a thread of this registry has ended after one request, and while
        none has served two (a server that gives each request a thread of its
        own), the thread's idle PostgreSQL connections go to the next thread
        now, not when this one ends, which may be after the next request's
        thread has started.
        """
        closer = self._local.__dict__.get("closer")
        if closer is None:
            return
        closer.served[0] = handles.requests
        if handles.requests > 1:
            self._pooled = True
        if self._pooled or not self._short_threads:
            return
        for store in closer.stores:
            handoff.release(store)

    def database(self, name: str | None = None) -> Database:
        """The Storm database of the store called ``name`` (the default if ``None``)."""
        name = self.default_name if name is None else name
        self._check_name(name)
        return self._default_databases[name]

    def set_default_uri(self, name: str, default_uri: DatabaseSpec) -> None:
        """Make ``default_uri`` the database of the stores called ``name`` (ZStorm's API).

        The URI is checked as the constructor checks it, and only its
        redacted form is kept (:meth:`get_default_uris`, the repr).

        :raises ConfigurationError: as the constructor would for ``default_uri``.
        """
        self._set_database(name, default_uri)

    def _set_database(self, name: str, spec: DatabaseSpec) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"store names must be non-empty strings, not {name!r}")
        database, shown = open_database(spec)
        if self.two_phase:
            twophase.check_database(name, database)
        handoff.install(database, self.spare_connections, self.spare_timeout)
        self._default_databases[name] = database
        self._default_uris[name] = shown

    def transact(self, function: Any = None, /, **options: Any) -> Any:
        """Run a function as a unit of work in this registry's stores, retried as need be.

        ``@registry.transact`` or ``@registry.transact(savepoint=True,
        policy=..., timeouts=...)``; see :func:`middlestorm.work.transact`.
        """
        return work.transact(self, function, **options)

    def transaction(self, **options: Any) -> AbstractContextManager[None]:
        """``with registry.transaction():`` a unit of work, committed at the end of the block.

        ``savepoint=True`` and ``timeouts=`` as :func:`middlestorm.work.transaction`.
        """
        return work.transaction(self, **options)

    def set_default_tpc(self, name: str, default_flag: bool) -> None:
        """Refused: Storm's own two-phase mode; ``StoreRegistry(two_phase=True)`` replaces it.

        :raises ConfigurationError: always.
        """
        raise ConfigurationError(
            "a StoreRegistry does not take Storm's set_default_tpc(): create it with "
            "two_phase=True for two-phase commit across its stores (middlestorm.twophase)"
        )

    def get(self, name: str | None = None, default_uri: str | None = None) -> Store:
        """Return this thread's store called ``name``, creating it on first use.

        :raises UnknownStoreError: when no database is configured for ``name``.
        """
        if name is None:
            name = self.default_name
        store = self._named.get(name)
        if store is None:
            if default_uri is None:
                self._check_name(name)
            store = self.create(name, default_uri)
        return store

    def create(self, name: str | None, uri: str | None = None) -> Store:
        """Create a store in this thread (see ``ZStorm.create``)."""
        try:
            store = super().create(name, uri)
        except StormDatabaseError as error:  # Store() connects at once
            raise DisconnectionError(self._cannot_open(name, uri, error)) from error
        store._event.unhook(
            "register-transaction", register_store_with_transaction, weakref.ref(self)
        )
        datamanager.hook(store, self)
        owner = threading.current_thread()
        store._event.hook(
            "register-transaction", _refuse_other_threads, owner.ident, owner.name, name
        )
        thread_stores = self._local.__dict__.get("closer")
        if thread_stores is None:
            thread_stores = self._local.closer = _ThreadStores(self)
        thread_stores.stores.append(store)
        return store

    def remove(self, store: Store) -> None:
        """Stop managing ``store`` (see ``ZStorm.remove``); it is not closed."""
        super().remove(store)
        datamanager.unhook(store, self)
        thread_stores = self._local.__dict__.get("closer")
        if thread_stores is not None and store in thread_stores.stores:
            thread_stores.stores.remove(store)

    def release(self) -> None:
        """Close the calling thread's stores; the next :meth:`get` opens new ones.

        Call it between transactions: what the stores did in the current
        transaction is lost, and a later abort of it fails.
        """
        for _, store in list(self.iterstores()):
            self.remove(store)
            _close(store)

    def close(self) -> None:
        """Close the calling thread's stores and the spare connections, as the server stops."""
        self.release()
        self.close_spare_connections()

    def close_spare_connections(self) -> None:
        """Close the connections ended threads left for new ones (:mod:`middlestorm.handoff`)."""
        for database in self._default_databases.values():
            handoff.close_spares(database)

    def _get_database(self, uri: str) -> Database:
        database = self._databases.get(uri)
        if database is None:
            database = self._databases.setdefault(uri, open_database(uri)[0])
        return database

    def _cannot_open(self, name: str | None, uri: str | None, error: Exception) -> str:
        """Why the store ``name`` could not connect, naming its database (never a password)."""
        name = self.default_name if name is None else name
        if uri is None:
            database, shown = self._default_databases.get(name), self._default_uris.get(name)
        else:
            database, shown = self._databases.get(uri), redact_uri(uri)
        reason = str(error).strip()
        if isinstance(database, SQLite):
            filename = database._filename
            path = os.path.abspath(filename)
            shown = repr(filename) if path == filename else f"{filename!r} ({path})"
            return (
                f"cannot open the SQLite database {shown} of the store {name!r}: "
                f"{reason}{_sqlite_hint(path)}"
            )
        return f"cannot connect to the database {shown!r} of the store {name!r}: {reason}"

    def _check_name(self, name: str) -> None:
        if name not in self._default_databases:
            known = ", ".join(repr(n) for n in self._default_databases)
            raise UnknownStoreError(f"no store named {name!r}; the configured stores are {known}")

    def _after_fork(self) -> None:
        """In a forked child: abandon the stores inherited from the parent.

        The forking thread's are abandoned now; those of the parent's other
        threads when their thread-local state goes, by their finalizers,
        which see the new pid.
        """
        thread_stores = self._local.__dict__.get("closer")
        if thread_stores is not None:
            thread_stores.end()
        self._local = threading.local()


class _ThreadStores:
    """Held in one thread's slot of a registry; closes its stores when the thread ends."""

    def __init__(self, registry: StoreRegistry) -> None:
        self.stores: list[Store] = []
        #: How many WSGI requests the thread had served when its last one ended.
        self.served = [0]
        self._finalizer = weakref.finalize(
            self, _close_all, self.stores, os.getpid(), self.served, weakref.ref(registry)
        )
        self._finalizer.atexit = False

    def end(self) -> None:
        """Close the stores now (abandon them in a forked child), not when the thread ends."""
        self._finalizer()


def _close_all(
    stores: list[Store], pid: int, served: list[int], registry: weakref.ref[StoreRegistry]
) -> None:
    closing = _retire if os.getpid() == pid else _abandon
    for store in stores:
        closing(store)
    owner = registry()
    if served[0] == 1 and owner is not None and os.getpid() == pid:
        owner._short_threads = True  # this thread ended after one request


def _retire(store: Store) -> None:
    """Close a store whose thread ended, handing its connection to the next thread."""
    try:
        handoff.hand_over(store)
    except Exception:
        log.debug("handing a connection over failed", exc_info=True)
    _close(store)


def _close(store: Store) -> None:
    try:
        store.close()
    except Exception:
        log.debug("closing a store failed", exc_info=True)


#: Raw connections inherited from a parent process, kept so that their
#: destructors never run in the child.
_abandoned: list[object] = []


def _abandon(store: Store) -> None:
    """Drop a store inherited across fork without touching the parent's session.

    The Storm connection is left closed and blocked, and marked disconnected
    (no SQLite transaction either), so that a rollback or close of it is a
    no-op and any other use raises, instead of reaching for the raw connection.

    Closing a driver connection sends a goodbye on the socket the parent still
    uses; pointing the descriptor at /dev/null first makes it harmless. A
    connection that cannot be detached that way is kept, never destroyed.
    """
    connection = store._connection
    raw, connection._raw_connection = connection._raw_connection, None
    connection._closed = True
    connection.block_access()
    connection._state = STATE_DISCONNECTED
    if getattr(connection, "_in_transaction", False):
        connection._in_transaction = False  # storm.databases.sqlite would send ROLLBACK
    if raw is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, raw.fileno())
        finally:
            os.close(devnull)
        raw.close()
    except Exception:
        _abandoned.append(raw)


def _refuse_other_threads(store: Store, owner: int, owner_name: str, name: str | None) -> None:
    if threading.get_ident() != owner:
        raise WrongThreadError.for_store(f"the store {name!r}", owner, owner_name)


def _sqlite_hint(path: str) -> str:
    """What keeps SQLite from opening the file ``path``, when the file system tells."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return (
            f"; the directory {directory!r} does not exist: create it, or give the path "
            "of a file in an existing directory"
        )
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return "; this process may not read and write the file"
    if not os.path.exists(path) and not os.access(directory, os.W_OK | os.X_OK):
        return f"; this process may not create files in {directory!r}"
    return ""


def _check_thread_local(manager: ITransactionManager | None) -> None:
    if isinstance(manager, transaction.TransactionManager) and not isinstance(
        manager, threading.local
    ):
        raise ConfigurationError(
            "the transaction manager must be thread-local: a transaction.TransactionManager() "
            "has one transaction for every thread, so concurrent requests would commit and "
            "abort each other's work; pass transaction.ThreadTransactionManager() instead, "
            "or no transaction_manager to use transaction.manager"
        )


def _inherited_transaction(
    manager: ITransactionManager,
) -> tuple[transaction.TransactionManager, ITransaction] | None:
    """The forking thread's transaction in ``manager``, with the manager holding it.

    None when there is none, or when ``manager`` is of a kind whose
    transaction cannot be read without starting one.
    """
    inner = thread_manager(manager)  # a thread-local manager's: the forking thread's own
    if inner is None or inner._txn is None:
        return None
    return inner, inner._txn


def _drop_inherited_transactions(registries: list[StoreRegistry]) -> None:
    """Forget each manager's transaction that a registry's store had joined.

    Its data managers are not called: aborting would roll back the
    parent's connections, and an explicit manager would refuse the child's
    first ``begin()``. The parent's transaction goes on in the parent.
    """
    owners = {id(registry) for registry in registries}
    managers = {id(r.transaction_manager): r.transaction_manager for r in registries}
    for manager in managers.values():
        inherited = _inherited_transaction(manager)
        if inherited is None:
            continue
        holder, current = inherited
        joined = getattr(current, "_resources", ())
        if any(id(getattr(resource, "_zstorm", None)) in owners for resource in joined):
            holder.free(current)


def _reset_registries_after_fork() -> None:
    """In a forked child: no store, connection or transaction of the parent's is used."""
    registries = list(_registries)
    for registry in registries:
        registry._after_fork()
    _drop_inherited_transactions(registries)


os.register_at_fork(after_in_child=_reset_registries_after_fork)
