"""The store of the request being handled, without passing ``environ`` around.

A request (or a :func:`use_registry` block) binds the stores of the thread it
runs in. The binding is a context variable, so it follows the request into
code run in a copy of its context, another thread included (an executor that
copies contexts, ``asyncio.to_thread``); using :data:`current_store` there
raises :class:`~middlestorm.errors.WrongThreadError` rather than handing that
thread a store in a transaction nobody ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, TypeVar, cast

from storm.store import Store
from werkzeug.local import LocalProxy

from middlestorm.errors import NoRequestError
from middlestorm.handles import ThreadStores

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

T = TypeVar("T")

__all__ = ["current_registry", "current_store", "get_store", "use_registry"]

_stores: ContextVar[ThreadStores | None] = ContextVar("middlestorm.stores", default=None)


def current_stores() -> ThreadStores:
    """The stores of the request being handled (of the thread that handles it).

    :raises NoRequestError: outside a request (and outside :func:`use_registry`).
    """
    stores = _stores.get()
    if stores is None:
        raise NoRequestError(
            "no middlestorm store is active here: current_store works while MiddleStorm "
            "handles a request, or inside 'with middlestorm.use_registry(registry):'"
        )
    return stores


def current_registry() -> StoreRegistry:
    """The registry of the request being handled.

    :raises NoRequestError: outside a request (and outside :func:`use_registry`).
    """
    return current_stores().registry


def get_store(name: str | None = None) -> Store:
    """The request's store called ``name`` (the default store if ``None``).

    :raises NoRequestError: outside a request (and outside :func:`use_registry`).
    :raises WrongThreadError: in a thread other than the request's.
    """
    return current_stores().get(name)


@contextmanager
def use_registry(registry: StoreRegistry) -> Iterator[StoreRegistry]:
    """Make ``registry``'s stores of this thread the ones :data:`current_store` uses here."""
    token = bind(registry.thread_stores())
    try:
        yield registry
    finally:
        unbind(token)


def bind(stores: ThreadStores) -> Token[ThreadStores | None]:
    """Make ``stores`` current until :func:`unbind` is given the returned token."""
    return _stores.set(stores)


def unbind(token: Token[ThreadStores | None]) -> None:
    """Undo :func:`bind`."""
    restore(_stores, token)


def restore(variable: ContextVar[T | None], token: Token[T | None]) -> None:
    """Reset ``variable`` with ``token``, even from a copy of the context that set it."""
    try:
        variable.reset(token)
    except ValueError:
        variable.set(None if token.old_value is Token.MISSING else token.old_value)


#: A proxy to the default store of the request being handled.
current_store = cast(Store, LocalProxy(get_store))
