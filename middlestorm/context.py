"""The store of the request being handled, without passing ``environ`` around."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, TypeVar, cast

from storm.store import Store
from werkzeug.local import LocalProxy

from middlestorm.errors import NoRequestError

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

T = TypeVar("T")

__all__ = ["current_registry", "current_store", "get_store", "use_registry"]

_registry: ContextVar[StoreRegistry | None] = ContextVar("middlestorm.registry", default=None)


def current_registry() -> StoreRegistry:
    """The registry of the request being handled.

    :raises NoRequestError: outside a request (and outside :func:`use_registry`).
    """
    registry = _registry.get()
    if registry is None:
        raise NoRequestError(
            "no middlestorm store is active here: current_store works while MiddleStorm "
            "handles a request, or inside 'with middlestorm.use_registry(registry):'"
        )
    return registry


def get_store(name: str | None = None) -> Store:
    """This thread's store called ``name`` (the default store if ``None``)."""
    return current_registry().get(name)


@contextmanager
def use_registry(registry: StoreRegistry) -> Iterator[StoreRegistry]:
    """Make ``registry`` the one :data:`current_store` uses in this block."""
    token = bind(registry)
    try:
        yield registry
    finally:
        unbind(token)


def bind(registry: StoreRegistry) -> Token[StoreRegistry | None]:
    """Make ``registry`` current until :func:`unbind` is given the returned token."""
    return _registry.set(registry)


def unbind(token: Token[StoreRegistry | None]) -> None:
    """Undo :func:`bind`."""
    restore(_registry, token)


def restore(variable: ContextVar[T | None], token: Token[T | None]) -> None:
    """Reset ``variable`` with ``token``, even from a copy of the context that set it."""
    try:
        variable.reset(token)
    except ValueError:
        variable.set(None if token.old_value is Token.MISSING else token.old_value)


#: A proxy to the default store of the request being handled.
current_store = cast(Store, LocalProxy(get_store))
