"""What one route asks of its request's transaction: a read-only one, or none.

A request's transaction is committed when its response succeeds. A route can
ask for less, before it uses a store:

* **read-only**: the database refuses every write (PostgreSQL's ``SET
  TRANSACTION READ ONLY``, SQLite's ``PRAGMA query_only``), and the
  transaction ends with a ROLLBACK, which skips the commit machinery;
* **none**: the route has no request transaction. Its units of work
  (``with registry.transaction():``, ``@registry.transact``) commit on their
  own, and whatever a store did outside them is rolled back at the end, with
  a warning. Such a request is never run again after a failure: its units
  of work retry themselves.

As a decorator of a view or of a WSGI application inside :class:`MiddleStorm`::

    from middlestorm.routes import no_transaction, read_only

    @read_only
    def report(environ, start_response):
        ...

or from a layer in front of MiddleStorm (a router), in ``environ``::

    environ["middlestorm.mode"] = "read-only"      # or "none"

Every request's transaction is annotated with its method and path and, when
the app says who (``environ["middlestorm.user"]``, else ``REMOTE_USER``), its
user: ``transaction.get().description`` and ``.user``, which after-commit
hooks and logs can read.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from typing import Any, TypeVar

from storm.databases.sqlite import SQLite
from storm.store import Store
from transaction.interfaces import ITransaction, ITransactionManager

from middlestorm import context, handoff, timeouts, work
from middlestorm.errors import MiddleStormError, NoRequestError

__all__ = ["MODE_KEY", "USER_KEY", "Mode", "no_transaction", "read_only", "set_mode"]

log = logging.getLogger(__name__)

#: The ``environ`` key a layer in front of MiddleStorm may set to a :class:`Mode` value.
MODE_KEY = "middlestorm.mode"
#: The ``environ`` key naming the request's user, for the transaction's annotation.
USER_KEY = "middlestorm.user"

F = TypeVar("F", bound=Callable[..., Any])


class Mode(str, enum.Enum):
    """What a request's transaction is."""

    #: Committed when the response succeeds, aborted otherwise (the default).
    REQUEST = "request"
    #: Writes refused by the database; rolled back at the end.
    READ_ONLY = "read-only"
    #: No request transaction: units of work commit on their own.
    NONE = "none"


class Route:
    """The mode of one request, and the stores made read-only for it."""

    __slots__ = ("joined", "manager", "mode", "read_only_stores")

    def __init__(self, mode: Mode, manager: ITransactionManager) -> None:
        self.mode = mode
        self.manager = manager
        #: Whether a store has joined the request's transaction.
        self.joined = False
        self.read_only_stores: list[Store] = []


_route: ContextVar[Route | None] = ContextVar("middlestorm.route", default=None)


def parse_mode(value: object, where: str) -> Mode:
    """The :class:`Mode` ``value`` names.

    :raises ValueError: naming ``where`` it came from and the modes there are.
    """
    try:
        return Mode(value)
    except ValueError:
        raise ValueError(
            f"{where} is {value!r}: use one of {', '.join(repr(mode.value) for mode in Mode)}"
        ) from None


def begin(environ: Mapping[str, Any], manager: ITransactionManager) -> Token[Route | None]:
    """Start a request's route, in the mode ``environ`` asks for; undo with :func:`end`."""
    value = environ.get(MODE_KEY)
    mode = Mode.REQUEST if value is None else parse_mode(value, f"environ[{MODE_KEY!r}]")
    route = Route(mode, manager)
    if mode is Mode.NONE:
        work.leave_unit(manager)
    return _route.set(route)


def current() -> Route | None:
    """The route of the request under way, if any."""
    return _route.get()


def end(token: Token[Route | None], route: Route | None) -> None:
    """End the request's ``route``: its SQLite connections may write again."""
    context.restore(_route, token)
    if route is None:
        return
    for store in route.read_only_stores:
        raw = store._connection._raw_connection
        if raw is not None:
            try:
                raw.execute("PRAGMA query_only = 0")
            except Exception:
                log.warning(
                    "an SQLite connection of a read-only request could not be made writable "
                    "again; it is closed, and the store opens another when next used",
                    exc_info=True,
                )
                store._connection.close()
                handoff.reopen_later(store)
    route.read_only_stores.clear()


def apply(store: Store, manager: ITransactionManager) -> None:
    """Make ``store`` read-only as it joins a read-only request's transaction of ``manager``
    (a unit of work of another manager, another registry's, is left alone)."""
    route = _route.get()
    if route is None or route.manager is not manager:
        return
    route.joined = True
    if route.mode is not Mode.READ_ONLY:
        return
    if timeouts.is_postgres(store):
        timeouts.send(store, "SET TRANSACTION READ ONLY")
    elif isinstance(store.get_database(), SQLite):
        timeouts.send(store, "PRAGMA query_only = 1")
        route.read_only_stores.append(store)


def set_mode(mode: Mode | str) -> None:
    """Give the request under way ``mode``; call it before the request uses a store.

    :raises NoRequestError: outside a request.
    :raises MiddleStormError: once a store has joined the request's transaction.
    :raises ValueError: for a mode that is not one of :class:`Mode`.
    """
    mode = parse_mode(mode, "the mode")
    route = _route.get()
    if route is None:
        raise NoRequestError(
            f"set_mode({mode.value!r}) works while MiddleStorm handles a request: "
            "there is no request transaction here"
        )
    if route.mode is mode:
        return
    if route.joined:
        raise MiddleStormError(
            f"the request's transaction is under way, so it cannot become {mode.value!r}: "
            "ask for it before the route uses a store (decorate the view, or set "
            f"environ[{MODE_KEY!r}] in front of MiddleStorm)"
        )
    if mode is Mode.NONE:
        work.leave_unit(route.manager)
    elif route.mode is Mode.NONE:
        work.join_unit(route.manager)
    route.mode = mode


def read_only(view: F) -> F:
    """Run ``view`` (a WSGI application or any function called in the request) read-only."""
    return _in_mode(view, Mode.READ_ONLY)


def no_transaction(view: F) -> F:
    """Run ``view`` without a request transaction: its units of work commit on their own."""
    return _in_mode(view, Mode.NONE)


def _in_mode(view: F, mode: Mode) -> F:
    @functools.wraps(view)
    def in_mode(*args: Any, **kwargs: Any) -> Any:
        set_mode(mode)
        return view(*args, **kwargs)

    return in_mode  # type: ignore[return-value]


def annotate(txn: ITransaction, environ: Mapping[str, Any]) -> None:
    """Note the request's method and path, and its user if known, on ``txn``."""
    txn.note(f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}")
    user = environ.get(USER_KEY) or environ.get("REMOTE_USER")
    if user:
        txn.user = str(user)
