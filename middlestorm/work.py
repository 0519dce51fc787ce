"""A unit of work: begin, run, classify the failure, retry or end.

The same loop serves a WSGI request (:mod:`middlestorm.wsgi` adds what is
HTTP's: replaying the body, knowing what the client has seen, status codes)
and work outside one (:func:`run_in_transaction`).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from middlestorm import timeouts as limits
from middlestorm.lifecycle import abort_quietly, end_transaction
from middlestorm.retry import DEFAULT_POLICY, RetryPolicy, Verdict, classify

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["Attempt", "Next", "Unit", "attempts", "note_commit", "run_in_transaction"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Unit:
    """One run of a unit of work in one thread, and whether anything of it was committed.

    Once something was, the run must not be repeated: whatever committed would
    be done twice. Every COMMIT of a registry's store marks it: the request's
    own, and an app's ``transaction.commit()`` or ``store.commit()`` in the
    middle of it. (A transaction of other data managers only, committed by the
    app, is not seen.)
    """

    thread: int = field(default_factory=threading.get_ident)
    committed: bool = False


_unit: ContextVar[Unit | None] = ContextVar("middlestorm.unit", default=None)


def begin_unit() -> tuple[Unit, Token[Unit | None]]:
    """Start recording a run of a unit of work in this context; undo with :func:`end_unit`."""
    unit = Unit()
    return unit, _unit.set(unit)


def end_unit(token: Token[Unit | None]) -> None:
    _unit.reset(token)


def note_commit(status: bool = True) -> None:
    """Record that something of the unit of work under way has been committed."""
    unit = _unit.get()
    if status and unit is not None:
        unit.committed = True


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
) -> T:
    """Run ``function`` in a transaction of the registry's manager and commit it.

    A transient failure (of ``function`` or of the commit) aborts and runs
    it again, as the policy allows; any other failure aborts and is raised,
    and so is the last transient one. ``function`` must be safe to run more
    than once: it sees nothing of a failed attempt but what it kept itself.

    :param timeouts: limits PostgreSQL enforces on each attempt's transaction.
    :returns: what ``function`` returned in the attempt that committed.
    :raises RuntimeError: inside a unit of work of the same thread (a request):
        its ``begin()`` would end that unit's transaction.
    """
    outer = _unit.get()
    if outer is not None and outer.thread == threading.get_ident():
        raise RuntimeError(
            "run_in_transaction() was called inside a unit of work (a request) of the same "
            "thread: beginning its transaction would end the request's; do the work in the "
            "request's transaction, or in another thread"
        )
    manager = registry.transaction_manager
    for attempt in attempts(policy):
        manager.begin()
        unit, unit_token = begin_unit()
        token = limits.bind(timeouts)
        try:
            result = function()
            end_transaction(registry, commit=True)
        except BaseException as error:
            abort_quietly(manager)
            if not unit.committed and attempt.failed(error) is Next.RETRY:
                continue
            raise
        finally:
            limits.unbind(token)
            end_unit(unit_token)
        return result
    raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover
