"""The store registry: one Storm store per thread per name, built on ZStorm.

A :class:`StoreRegistry` is a ``storm.zope.zstorm.ZStorm`` of its own (so two
registries in one process never share stores or a transaction manager) that
adds what a multithreaded server needs:

* stores are created on first use in a thread and reused by that thread;
* a store's connection is closed when its thread ends;
* a forked child never touches a connection its parent opened;
* a store used from another thread raises :class:`WrongThreadError`.

It needs no WSGI: worker threads can use the same registry as the middleware.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping

import transaction
from storm.database import Database
from storm.store import Store
from storm.zope.zstorm import ZStorm
from transaction.interfaces import ITransactionManager

from middlestorm.databases import DatabaseSpec, open_database
from middlestorm.errors import ConfigurationError, UnknownStoreError, WrongThreadError

__all__ = ["DEFAULT_STORE", "StoreRegistry"]

log = logging.getLogger(__name__)

#: The name of the store a registry hands out when no name is given.
DEFAULT_STORE = "main"

_registries: weakref.WeakSet[StoreRegistry] = weakref.WeakSet()


class StoreRegistry(ZStorm):
    """Named Storm databases, and one store per thread for each of them.

    >>> registry = StoreRegistry({"main": "sqlite:app.db"})
    >>> store = registry.get()          # this thread's "main" store
    >>> store is registry.get("main")   # reused within the thread
    True

    :param databases: store names mapped to a Storm ``Database`` or a URI.
    :param default: the name :meth:`get` uses when given none; the first
        name in ``databases`` unless given.
    :param transaction_manager: the manager stores join; it must be
        thread-local (``transaction.manager``, the default, is).
    """

    def __init__(
        self,
        databases: Mapping[str, DatabaseSpec],
        *,
        default: str | None = None,
        transaction_manager: ITransactionManager | None = None,
    ) -> None:
        super().__init__()
        # ZStorm caches databases in a class attribute, shared by every
        # instance; each registry keeps its own.
        self._databases: dict[str, Database] = {}
        self.transaction_manager = transaction_manager or transaction.manager
        if not databases:
            raise ConfigurationError("a StoreRegistry needs at least one database")
        for name, spec in databases.items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"store names must be non-empty strings, not {name!r}")
            database, shown = open_database(spec)
            self._default_databases[name] = database
            self._default_uris[name] = shown
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

    def database(self, name: str | None = None) -> Database:
        """The Storm database of the store called ``name`` (the default if ``None``)."""
        name = self.default_name if name is None else name
        self._check_name(name)
        return self._default_databases[name]

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
        store = super().create(name, uri)
        owner = threading.get_ident()
        store._event.hook("register-transaction", _refuse_other_threads, owner, name)
        thread_stores = self._local.__dict__.get("closer")
        if thread_stores is None:
            thread_stores = self._local.closer = _ThreadStores()
        thread_stores.stores.append(store)
        return store

    def remove(self, store: Store) -> None:
        """Stop managing ``store`` (see ``ZStorm.remove``); it is not closed."""
        super().remove(store)
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

    def _get_database(self, uri: str) -> Database:
        database = self._databases.get(uri)
        if database is None:
            database = self._databases.setdefault(uri, open_database(uri)[0])
        return database

    def _check_name(self, name: str) -> None:
        if name not in self._default_databases:
            known = ", ".join(repr(n) for n in self._default_databases)
            raise UnknownStoreError(f"no store named {name!r}; the configured stores are {known}")

    def _after_fork(self) -> None:
        # The parent's stores stay behind in the old thread-local, whose
        # finalizers see the new pid and abandon the connections unused.
        self._local = threading.local()


class _ThreadStores:
    """Held in one thread's slot of a registry; closes its stores when the thread ends."""

    def __init__(self) -> None:
        self.stores: list[Store] = []
        finalizer = weakref.finalize(self, _close_all, self.stores, os.getpid())
        finalizer.atexit = False


def _close_all(stores: list[Store], pid: int) -> None:
    closing = _close if os.getpid() == pid else _abandon
    for store in stores:
        closing(store)


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

    Closing a driver connection sends a goodbye on the socket the parent still
    uses; pointing the descriptor at /dev/null first makes it harmless. A
    connection that cannot be detached that way is kept, never destroyed.
    """
    connection = store._connection
    raw, connection._raw_connection = connection._raw_connection, None
    connection._closed = True
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


def _refuse_other_threads(store: Store, owner: int, name: str | None) -> None:
    if threading.get_ident() != owner:
        raise WrongThreadError(
            f"the store {name!r} belongs to thread {owner} and was used from thread "
            f"{threading.get_ident()}; Storm stores are not thread-safe: get the store "
            "in the thread that uses it (environ, middlestorm.current_store or "
            "StoreRegistry.get())"
        )


def _reset_registries_after_fork() -> None:
    for registry in list(_registries):
        registry._after_fork()


os.register_at_fork(after_in_child=_reset_registries_after_fork)
