"""Limits the database enforces on a request: statement and idle-in-transaction timeouts.

They are sent as ``SET LOCAL`` when a PostgreSQL store joins the request's
transaction, so they hold for that transaction only: behind PgBouncer in
transaction pooling mode too, where a session-level ``SET`` would reach other
clients. With no limit set, nothing is sent: no extra round trip.

* ``statement``: a query running longer is cancelled by the server
  (SQLSTATE 57014); the request is aborted and answered 503.
* ``idle_in_transaction``: a transaction left idle longer (a streamed body
  whose server never closes it) has its session ended by the server, which
  releases its locks; Storm reconnects when the store is next used.

SQLite has neither; its stores get no limits.
"""

from __future__ import annotations

import math
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace

from storm.databases.postgres import Postgres
from storm.store import Store

from middlestorm.context import restore
from middlestorm.errors import ConfigurationError, NoRequestError

__all__ = ["QUERY_CANCELED", "Timeouts", "override"]

#: SQLSTATE of a statement the server cancelled (``statement_timeout`` among others).
QUERY_CANCELED = "57014"

_SETTINGS = {
    "statement": "statement_timeout",
    "idle_in_transaction": "idle_in_transaction_session_timeout",
}


@dataclass(frozen=True)
class Timeouts:
    """Seconds the database allows a statement, and a transaction left idle; None: no limit."""

    statement: float | None = None
    idle_in_transaction: float | None = None

    def __post_init__(self) -> None:
        for name in _SETTINGS:
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigurationError(
                    f"the {name} timeout must be a number of seconds > 0, or None, not {value!r}"
                )

    def __bool__(self) -> bool:
        return self.statement is not None or self.idle_in_transaction is not None

    def sql(self, *, reset_unset: bool = False) -> str:
        """``SET LOCAL`` for each limit set (and, with ``reset_unset``, back to the
        server's default for each one that is not)."""
        parts = []
        for name, setting in _SETTINGS.items():
            value = getattr(self, name)
            if value is not None:
                parts.append(f"SET LOCAL {setting} = {max(1, round(value * 1000))}")
            elif reset_unset:
                parts.append(f"SET LOCAL {setting} TO DEFAULT")
        return "; ".join(parts)


class _Budget:
    """The limits of the unit of work under way, and the stores that got them."""

    __slots__ = ("applied", "timeouts")

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.applied: list[Store] = []


_budget: ContextVar[_Budget | None] = ContextVar("middlestorm.timeouts", default=None)


_NO_LIMITS = Timeouts()


def bind(timeouts: Timeouts | None) -> Token[_Budget | None]:
    """Give the unit of work starting here ``timeouts``; undo with :func:`unbind`."""
    return _budget.set(_Budget(timeouts or _NO_LIMITS))


def unbind(token: Token[_Budget | None]) -> None:
    """Undo :func:`bind`, even from a copy of the context that bound."""
    restore(_budget, token)


_KEEP = object()


def override(*, statement: object = _KEEP, idle_in_transaction: object = _KEEP) -> None:
    """Change the current request's limits for the rest of its transaction.

    Stores already in the transaction get the new limits at once; ``None``
    goes back to the server's default. Call it before the slow statement::

        middlestorm.timeouts.override(statement=60)   # this report may take a minute
    """
    budget = _budget.get()
    if budget is None:
        raise NoRequestError(
            "timeouts.override() works inside a request (or run_in_transaction): "
            "there is no unit of work here whose limits it could change"
        )
    current = budget.timeouts
    changes = {
        name: value
        for name, value in (("statement", statement), ("idle_in_transaction", idle_in_transaction))
        if value is not _KEEP
    }
    timeouts = replace(current, **changes)  # type: ignore[arg-type]
    budget.timeouts = timeouts
    for store in budget.applied:
        send(store, timeouts.sql(reset_unset=True))


def apply(store: Store) -> None:
    """Send the current limits to ``store`` as it joins a transaction (PostgreSQL only)."""
    budget = _budget.get()
    if budget is None or not is_postgres(store):
        return
    if budget.timeouts:
        send(store, budget.timeouts.sql())
    budget.applied.append(store)  # so that override() can reach it


def send(store: Store, sql: str) -> None:
    """Run ``sql`` in ``store``'s transaction without joining it (as ``store.execute()`` would)."""
    connection = store._connection
    connection._ensure_connected()
    connection.raw_execute(sql).close()


def is_postgres(store: Store) -> bool:
    return isinstance(store._database, Postgres)
