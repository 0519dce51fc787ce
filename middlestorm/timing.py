"""What each request did to the database, from Storm's tracer API.

A request that is measured counts its statements and the time they took
(and the commit's); the middleware logs that at DEBUG on the
``middlestorm.timing`` logger and, with ``server_timing=True``, adds a
``Server-Timing`` header to responses whose headers are sent after the
commit (not to streamed ones).
"""

from __future__ import annotations

import logging
import threading
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

from storm.tracer import install_tracer

from middlestorm.context import restore

__all__ = ["RequestStats"]

log = logging.getLogger(__name__)


@dataclass
class RequestStats:
    """The statements one request sent and the seconds they took."""

    statements: int = 0
    seconds: float = 0.0
    commit_seconds: float = 0.0
    _started: float = field(default=0.0, repr=False)
    _token: Token[RequestStats | None] | None = field(default=None, repr=False)

    def server_timing(self) -> str:
        """The value of a ``Server-Timing`` header for these figures."""
        return (
            f'db;dur={self.seconds * 1000:.2f};desc="{self.statements} statements", '
            f"commit;dur={self.commit_seconds * 1000:.2f}"
        )


_current: ContextVar[RequestStats | None] = ContextVar("middlestorm.stats", default=None)


class _StatsTracer:
    """Adds each statement's count and time to the current request's stats."""

    def connection_raw_execute(self, connection, raw_cursor, statement, params) -> None:
        stats = _current.get()
        if stats is not None:
            stats._started = time.perf_counter()

    def connection_raw_execute_success(self, connection, raw_cursor, statement, params) -> None:
        stats = _current.get()
        if stats is not None:
            stats.statements += 1
            stats.seconds += time.perf_counter() - stats._started

    def connection_raw_execute_error(self, connection, raw_cursor, statement, params, error):
        self.connection_raw_execute_success(connection, raw_cursor, statement, params)


_installed = False
_install_lock = threading.Lock()


def start() -> RequestStats:
    """Measure the calling context's statements from now on."""
    global _installed
    if not _installed:
        with _install_lock:
            if not _installed:
                install_tracer(_StatsTracer())
                _installed = True
    stats = RequestStats()
    stats._token = _current.set(stats)
    return stats


def current() -> RequestStats | None:
    """The figures so far of the request measured here (see :func:`start`), if any."""
    return _current.get()


def stop(stats: RequestStats) -> bool:
    """Stop measuring into ``stats`` (see :func:`start`); false if already stopped."""
    if stats._token is None:
        return False
    restore(_current, stats._token)
    stats._token = None
    return True
