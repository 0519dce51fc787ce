"""Which failures are worth another attempt, and how long to wait before it.

A unit of work that fails on a *transient* error -- one that says nothing
about the work itself, only about its timing -- is aborted and run again from
the start, in a fresh transaction:

* ``transaction.interfaces.TransientError``;
* PostgreSQL's serialization failure (SQLSTATE 40001) and deadlock (40P01);
* a connection the database dropped (Storm's ``DisconnectionError``) before
  the COMMIT was sent: nothing was committed, and Storm reconnects on the
  next attempt;
* SQLite's "database is locked" (SQLite gives Storm no code for it).

A connection lost *during* the COMMIT is different: the database may or may
not have committed, so running the work again could do it twice. Such a
failure is :data:`Verdict.IN_DOUBT` and is never retried.
"""

from __future__ import annotations

import enum
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from storm.exceptions import DisconnectionError
from transaction.interfaces import TransientError

from middlestorm.errors import CommitInDoubtError, ConfigurationError

__all__ = ["DEFAULT_POLICY", "RetryPolicy", "Verdict", "classify", "sqlstate"]

#: SQLSTATEs of failures that another attempt may not meet.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
_SQLITE_LOCKED = ("database is locked", "database table is locked")


class Verdict(enum.Enum):
    """What a failure says about running the unit of work again."""

    #: Nothing was committed and another attempt may succeed.
    TRANSIENT = "transient"
    #: The COMMIT's outcome is unknown: never run the work again.
    IN_DOUBT = "in doubt"
    #: Another attempt would fail the same way.
    PERMANENT = "permanent"


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE a database error carries, if its driver gives one.

    Storm's wrapped psycopg2 errors keep it as ``_pgcode`` (their ``pgcode``
    attribute is broken); psycopg2's own errors as ``pgcode``.
    """
    code = getattr(error, "_pgcode", None)
    if code is None:
        code = getattr(error, "pgcode", None)
    return code if isinstance(code, str) else None


def classify(error: BaseException) -> Verdict:
    """Whether ``error`` ended an attempt that may be run again."""
    causes = list(_chain(error))
    if any(isinstance(cause, CommitInDoubtError) for cause in causes):
        return Verdict.IN_DOUBT
    for cause in causes:
        if isinstance(cause, (TransientError, DisconnectionError)):
            return Verdict.TRANSIENT
        if sqlstate(cause) in TRANSIENT_SQLSTATES:
            return Verdict.TRANSIENT
        if isinstance(cause, sqlite3.OperationalError) and str(cause) in _SQLITE_LOCKED:
            return Verdict.TRANSIENT
    return Verdict.PERMANENT


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from or during, without looping."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a unit of work that failed transiently is run again.

    :param attempts: runs in all, the first included; 1 turns retrying off.
    :param backoff: the longest wait before the second attempt, in seconds;
        it doubles for each attempt after that, up to ``max_backoff``. Each
        wait is drawn at random between 0 and that bound ("full jitter"), so
        requests that conflicted do not meet again in step.
    :param max_backoff: the longest wait between two attempts.
    :param deadline: no attempt starts this many seconds after the first did.
    :param retry_after: the seconds a ``Retry-After`` header suggests to a
        client whose request ran out of attempts.
    """

    attempts: int = 6
    backoff: float = 0.05
    max_backoff: float = 1.0
    deadline: float = 10.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigurationError(
                f"attempts must be a whole number >= 1 (1: no retry), not {self.attempts!r}"
            )
        for name in ("backoff", "max_backoff", "deadline"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigurationError(f"{name} must be a number of seconds >= 0, not {value!r}")
        if not isinstance(self.retry_after, int) or self.retry_after < 0:
            raise ConfigurationError(
                f"retry_after must be a whole number of seconds >= 0, not {self.retry_after!r}"
            )

    def delay(self, attempt: int, elapsed: float) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``; None when none is left.

        :param attempt: the attempt that just failed, from 1.
        :param elapsed: seconds since the first attempt started.
        """
        if attempt >= self.attempts:
            return None
        bound = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        wait = random.uniform(0, bound)
        if elapsed + wait >= self.deadline:
            return None
        return wait


#: Six attempts, waits of up to 50, 100, 200, 400 and 800 ms, within 10 seconds:
#: 8 threads incrementing 5 shared counters got 100% of 200s with it on
#: PostgreSQL, against 97.4% with three attempts (REPEATABLE READ).
DEFAULT_POLICY = RetryPolicy()
