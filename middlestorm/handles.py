"""Handles on one thread's stores that refuse every other thread.

What the middleware puts in ``environ``, and what ``current_store`` resolves
to, belongs to the request's thread. Storm stores are not thread-safe, and a
registry hands each thread a store of its own; so a handle that resolved in
whichever thread used it would let a worker thread handed the request's store
write into *its* store, in a transaction nobody ends. These handles raise
:class:`WrongThreadError` instead, before any statement is sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from storm.store import Store
from werkzeug.local import LocalProxy

from middlestorm.errors import WrongThreadError

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["ThreadStores"]


class _StoreProxy(LocalProxy):
    """A lazy store that isinstance() checks (gunicorn's access log) do not resolve."""

    __slots__ = ()

    @property  # type: ignore[misc]
    def __class__(self):
        return Store


class ThreadStores:
    """The stores one thread has from a registry, by name.

    ``stores["reports"]`` and ``stores.get("reports")`` return the thread's
    store called ``reports`` (created on first use); ``stores.get()`` the
    default one, which :attr:`default` also reaches lazily. Every access from
    another thread raises :class:`WrongThreadError` naming both threads.
    """

    __slots__ = ("default", "registry", "requests", "thread", "thread_name")

    def __init__(self, registry: StoreRegistry) -> None:
        self.registry = registry
        self.thread = threading.get_ident()
        self.thread_name = threading.current_thread().name
        #: A lazy proxy to the default store: nothing connects until it is used.
        self.default = cast(Store, _StoreProxy(self.get))
        #: How many WSGI requests the thread has served with them.
        self.requests = 0

    def get(self, name: str | None = None) -> Store:
        """This thread's store called ``name`` (the default store if ``None``).

        :raises WrongThreadError: in any thread but the one these stores belong to.
        :raises UnknownStoreError: when no database is configured for ``name``.
        """
        if threading.get_ident() != self.thread:
            raise self._wrong_thread(name)
        return self.registry.get(name)

    def __getitem__(self, name: str) -> Store:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.registry.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.registry.names)

    def __len__(self) -> int:
        return len(self.registry.names)

    @property
    def names(self) -> list[str]:
        """The configured store names, the default first."""
        return self.registry.names

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of thread {self.thread_name!r} in {self.registry!r}>"

    def _wrong_thread(self, name: str | None) -> WrongThreadError:
        name = self.registry.default_name if name is None else name
        return WrongThreadError.for_store(f"the store {name!r}", self.thread, self.thread_name)
