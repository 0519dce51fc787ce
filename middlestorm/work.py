"""A unit of work: begin, run, classify the failure, retry or end.

The same loop serves a WSGI request (:mod:`middlestorm.wsgi` adds what is
HTTP's: replaying the body, knowing what the client has seen, status codes)
and work outside one: :func:`run_in_transaction`, the :func:`transact`
decorator and the :func:`transaction` context manager, which worker
threads, Twisted (:mod:`middlestorm.twisted`) and asyncio
(:mod:`middlestorm.aio`) use too.

A unit of work inside another of the same thread and transaction manager
(a request, an outer ``transact``) joins its transaction: it commits
nothing of its own. With ``savepoint=True`` it runs inside a savepoint,
rolled back alone when it raises.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from storm.references import BoundIndirectReferenceSet, BoundReferenceSet
from storm.store import EmptyResultSet, ResultSet, Store

from middlestorm import context
from middlestorm import timeouts as limits
from middlestorm.errors import ConfigurationError, MiddleStormError
from middlestorm.lifecycle import abort_quietly, begin_transaction, end_transaction
from middlestorm.retry import DEFAULT_POLICY, RetryPolicy, Verdict, classify

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = [
    "Attempt",
    "Cancellation",
    "Cancelled",
    "LiveObjectError",
    "Next",
    "Unit",
    "attempts",
    "check_plain",
    "note_commit",
    "run_in_transaction",
    "run_in_worker",
    "transact",
    "transaction",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Unit:
    """One run of a unit of work in one thread, and whether anything of it was committed.

    Once something was, the run must not be repeated: whatever committed would
    be done twice. Every COMMIT of a registry's store marks it: the request's
    own, and an app's ``transaction.commit()`` or ``store.commit()`` in the
    middle of it. (A transaction of other data managers only, committed by the
    app, is not seen.)
    """

    __slots__ = ("committed", "managers", "outer", "thread")

    def __init__(self, managers: set[int] | None = None, outer: Unit | None = None) -> None:
        self.thread = threading.get_ident()
        self.committed = False
        #: ``id()`` of the transaction managers whose transaction it runs in.
        self.managers: set[int] = set() if managers is None else managers
        #: The unit of work this one runs inside (of another manager, or of a route
        #: without a request transaction): what this one commits, that one did too.
        self.outer = outer

    def __repr__(self) -> str:
        return f"<Unit of thread {self.thread} committed={self.committed}>"


class Cancelled(MiddleStormError):
    """The caller stopped waiting for a unit of work, so it was rolled back, not committed."""


class LiveObjectError(MiddleStormError, TypeError):
    """A unit of work run in a worker thread returned a Storm object, store or result set.

    They belong to the worker thread's store, which another thread must not
    use: return plain values (ids, strings, dicts of columns) instead.
    """


#: Values that cannot hold a Storm object.
_SCALARS = (str, bytes, int, float, bool, type(None))


def check_plain(value: object, what: str = "the unit of work") -> None:
    """Refuse a live Storm object, store or result set in ``value`` (in containers too).

    :raises LiveObjectError: naming what was found and what to return instead.
    """
    seen: set[int] = set()
    pending = [value]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _SCALARS):
            continue
        kind = type(item)
        if hasattr(kind, "__storm_table__") or isinstance(item, _STORM_TYPES):
            raise LiveObjectError(
                f"{what} returned {kind.__name__} {item!r:.80}, which belongs to the store of the "
                "worker thread that ran it and must not be used from another thread: return "
                "plain values (its id, or a dict or tuple of its columns) instead"
            )
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)


class Cancellation:
    """Set by a caller that stopped waiting for a unit of work run for it in another thread.

    Checked before the commit; a lighter ``threading.Event`` (set once, never cleared).
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self, *_: object) -> None:
        """Ask for the unit of work to be rolled back (any arguments are ignored:
        it serves as a ``Deferred``'s canceller)."""
        self._set = True

    def is_set(self) -> bool:
        return self._set


_unit: ContextVar[Unit | None] = ContextVar("middlestorm.unit", default=None)
_STORM_TYPES = (Store, ResultSet, EmptyResultSet, BoundReferenceSet, BoundIndirectReferenceSet)


def begin_unit(manager: object = None) -> tuple[Unit, Token[Unit | None]]:
    """Start recording a run of a unit of work in this context; undo with :func:`end_unit`."""
    unit = Unit(None if manager is None else {id(manager)})
    return unit, _unit.set(unit)


def join_unit(manager: object) -> None:
    """Have nested units of work join ``manager``'s transaction too (an inner middleware's)."""
    unit = _unit.get()
    if unit is not None and unit.thread == threading.get_ident():
        unit.managers.add(id(manager))


def leave_unit(manager: object) -> None:
    """Have nested units of work run transactions of ``manager`` of their own (a route
    without a request transaction)."""
    unit = _unit.get()
    if unit is not None and unit.thread == threading.get_ident():
        unit.managers.discard(id(manager))


def joins(registry: StoreRegistry) -> bool:
    """Whether a unit of work of this thread runs in the registry's manager's transaction."""
    unit = _unit.get()
    return (
        unit is not None
        and unit.thread == threading.get_ident()
        and id(registry.transaction_manager) in unit.managers
    )


def resume_unit(unit: Unit | None) -> Token[Unit | None] | None:
    """Make ``unit`` the one under way again (a streamed body, produced after its request
    returned); undo with :func:`end_unit`. ``None`` leaves the one under way as it is."""
    return None if unit is None else _unit.set(unit)


def end_unit(token: Token[Unit | None] | None) -> None:
    if token is not None:
        _unit.reset(token)


def note_commit(status: bool = True) -> None:
    """Record that something of the unit of work under way (and so of the units it runs
    inside) has been committed."""
    unit = _unit.get()
    while status and unit is not None:
        unit.committed = True
        unit = unit.outer


class Next(enum.Enum):
    """What follows a failed attempt."""

    #: Run the work again (after the wait the policy chose).
    RETRY = "retry"
    #: The failure was transient, but the policy has no attempt or time left.
    EXHAUSTED = "exhausted"
    #: The COMMIT's outcome is unknown: never run again.
    IN_DOUBT = "in doubt"
    #: Another attempt would fail the same way.
    GIVE_UP = "give up"


@dataclass
class Attempt:
    """One run of a unit of work, numbered from 1."""

    number: int
    policy: RetryPolicy
    started: float = field(default_factory=time.monotonic)

    def failed(self, error: BaseException, what: str = "unit of work") -> Next:
        """Decide what follows ``error``, logging it; waits first when the answer is RETRY."""
        verdict = classify(error)
        if verdict is Verdict.IN_DOUBT:
            log.error(
                "the %s's COMMIT is in doubt, so it is not run again: %s",
                what,
                str(error).strip(),
            )
            return Next.IN_DOUBT
        if verdict is Verdict.PERMANENT:
            return Next.GIVE_UP
        delay = self.policy.delay(self.number, time.monotonic() - self.started)
        if delay is None:
            log.warning(
                "the %s failed on a transient error in attempt %d of %d, with no attempt "
                "or time left: %s: %s",
                what,
                self.number,
                self.policy.attempts,
                type(error).__name__,
                str(error).strip(),
            )
            return Next.EXHAUSTED
        log.info(
            "the %s failed on a transient error in attempt %d; running it again in %.0f ms: %s: %s",
            what,
            self.number,
            delay * 1000,
            type(error).__name__,
            str(error).strip(),
        )
        time.sleep(delay)
        return Next.RETRY


def attempts(policy: RetryPolicy = DEFAULT_POLICY) -> Iterator[Attempt]:
    """Attempts 1, 2, … up to the policy's number, all timed from the first."""
    started = time.monotonic()
    for number in range(1, policy.attempts + 1):
        yield Attempt(number, policy, started)


def run_in_transaction(
    registry: StoreRegistry,
    function: Callable[[], T],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    timeouts: limits.Timeouts | None = None,
    savepoint: bool = False,
    cancelled: Cancellation | threading.Event | None = None,
) -> T:
    """Run ``function`` in a transaction of the registry's manager and commit it.

    A transient failure (of ``function`` or of the commit) aborts and runs
    it again, as the policy allows; any other failure aborts and is raised,
    and so is the last transient one. ``function`` must be safe to run more
    than once: it sees nothing of a failed attempt but what it kept itself.
    ``current_store`` and ``get_store()`` reach the registry's stores in it.

    Inside a unit of work of the same thread and manager (a request, an
    outer call), ``function`` joins that transaction instead, once: the
    outer unit commits it, or retries it with everything else.

    :param timeouts: limits PostgreSQL enforces on each attempt's transaction.
    :param savepoint: when joining, run ``function`` in a savepoint, rolled
        back alone if it raises (the error is raised still).
    :param cancelled: checked before each attempt and before committing:
        once set, nothing more is run, the attempt under way is rolled back,
        and :class:`Cancelled` raised (or the failure that ended the attempt).
    :returns: what ``function`` returned in the attempt that committed.
    """
    if joins(registry):
        with _joined(registry, savepoint):
            return function()
    manager = registry.transaction_manager
    for attempt in attempts(policy):
        if cancelled is not None and cancelled.is_set():
            again = " again" if attempt.number > 1 else ""
            raise Cancelled(f"the caller stopped waiting: the unit of work was not run{again}")
        with _Outermost(registry, timeouts) as unit:
            try:
                result = function()
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled("the caller stopped waiting: the unit of work was rolled back")
                end_transaction(registry, commit=True)
            except Cancelled:
                abort_quietly(manager)
                raise
            except BaseException as error:
                abort_quietly(manager)
                if (
                    not unit.committed
                    and (cancelled is None or not cancelled.is_set())
                    and attempt.failed(error) is Next.RETRY
                ):
                    continue
                raise
        return result
    raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover


def check_workers(workers: object) -> int:
    """A worker pool's size: a whole number of threads, at least 1.

    :raises ConfigurationError: for anything else.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigurationError(f"workers must be a whole number >= 1, not {workers!r}")
    return workers


def run_in_worker(
    registry: StoreRegistry,
    cancelled: Cancellation | threading.Event,
    function: Callable[..., T],
    /,
    *args: Any,
    policy: RetryPolicy = DEFAULT_POLICY,
    timeouts: limits.Timeouts | None = None,
    **kwargs: Any,
) -> T:
    """Run ``function(*args, **kwargs)`` as a unit of work for another thread, which gets
    its result: a plain value, checked before the commit (:func:`check_plain`)."""

    def checked() -> T:
        result = function(*args, **kwargs)
        if type(result) not in _SCALARS:
            check_plain(result, f"{getattr(function, '__qualname__', None) or repr(function)}()")
        return result

    return run_in_transaction(
        registry, checked, policy=policy, timeouts=timeouts, cancelled=cancelled
    )


@overload
def transact(registry: StoreRegistry, function: Callable[..., T], /) -> Callable[..., T]: ...
@overload
def transact(
    registry: StoreRegistry,
    function: None = None,
    /,
    *,
    policy: RetryPolicy = ...,
    timeouts: limits.Timeouts | None = ...,
    savepoint: bool = ...,
) -> Callable[[Callable[..., T]], Callable[..., T]]: ...
def transact(
    registry: StoreRegistry,
    function: Callable[..., T] | None = None,
    /,
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    timeouts: limits.Timeouts | None = None,
    savepoint: bool = False,
) -> Any:
    """Decorate ``function`` to run as a unit of work (:func:`run_in_transaction`).

    ``@registry.transact`` or ``@registry.transact(savepoint=True)``.
    """

    def decorate(function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def unit(*args: Any, **kwargs: Any) -> T:
            return run_in_transaction(
                registry,
                functools.partial(function, *args, **kwargs),
                policy=policy,
                timeouts=timeouts,
                savepoint=savepoint,
            )

        return unit

    return decorate if function is None else decorate(function)


@contextmanager
def transaction(
    registry: StoreRegistry,
    *,
    savepoint: bool = False,
    timeouts: limits.Timeouts | None = None,
) -> Iterator[None]:
    """A unit of work as a ``with`` block: committed at its end, rolled back if it raises.

    A block cannot be run again, so nothing is retried: use :func:`transact`
    for that. Inside another unit of work it joins that one's transaction
    (in a savepoint with ``savepoint=True``).
    """
    if joins(registry):
        with _joined(registry, savepoint):
            yield
        return
    with _Outermost(registry, timeouts):
        try:
            yield
        except BaseException:
            abort_quietly(registry.transaction_manager)
            raise
        end_transaction(registry, commit=True)


class _Outermost:
    """A unit of work's transaction (begun when first used), with its limits and stores,
    undone at the end of the block (which ends the transaction itself)."""

    __slots__ = ("_tokens", "registry", "timeouts")

    def __init__(self, registry: StoreRegistry, timeouts: limits.Timeouts | None) -> None:
        self.registry = registry
        self.timeouts = timeouts

    def __enter__(self) -> Unit:
        registry = self.registry
        manager = registry.transaction_manager
        begin_transaction(manager)
        outer = _unit.get()
        if outer is not None and outer.thread != threading.get_ident():
            outer = None  # a copy of another thread's context: its unit is not this one's
        unit = Unit({id(manager)}, outer)
        self._tokens = (
            _unit.set(unit),
            limits.bind(self.timeouts),
            context.bind(registry.thread_stores()),
        )
        return unit

    def __exit__(self, *exc_info: object) -> None:
        unit_token, limits_token, stores_token = self._tokens
        context.unbind(stores_token)
        limits.unbind(limits_token)
        end_unit(unit_token)


@contextmanager
def _joined(registry: StoreRegistry, savepoint: bool) -> Iterator[None]:
    """Inside an outer unit of work: its transaction, or a savepoint in it, rolled back
    to if the block raises (the transaction goes on)."""
    if not savepoint:
        yield
        return
    point = registry.transaction_manager.get().savepoint()
    try:
        yield
    except BaseException:
        point.rollback()
        raise
