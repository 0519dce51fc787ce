"""Connections that outlive short threads.

A server that runs every request in a new thread (werkzeug's development
server, ``socketserver.ThreadingMixIn``) would open a PostgreSQL connection
per request: a store belongs to its thread, and its connection is closed when
the thread ends. Instead, a thread that ends hands its connection to the
next thread that opens one for the same database, which resets it first:
ROLLBACK, then ``DISCARD ALL`` (no transaction, advisory lock, temporary
table, LISTEN or setting of the ended thread's session is left); one that
fails the reset is closed, and a new one opened.

At most ``keep`` connections wait per database; one that waited longer than
``timeout`` seconds is closed. A forked child never takes its parent's.
SQLite connections are never handed over: they belong to their thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any

from storm.database import STATE_CONNECTED, Database
from storm.databases.postgres import Postgres
from storm.store import Store

__all__ = [
    "SpareConnections",
    "close_spares",
    "connect_fresh",
    "hand_over",
    "install",
    "spare_count",
]

log = logging.getLogger(__name__)

_pools: weakref.WeakSet[SpareConnections] = weakref.WeakSet()
#: Connections inherited across fork(): the parent's sessions, never closed here.
_inherited: list[Any] = []


class SpareConnections:
    """The idle connections of ended threads, for one database."""

    def __init__(self, database: Database, keep: int, timeout: float) -> None:
        self.keep = keep
        self.timeout = timeout
        self._connect = database.raw_connect
        self._idle: list[tuple[float, Any]] = []  # (handed over at, raw connection)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        _pools.add(self)

    def __len__(self) -> int:
        return len(self._idle)

    def raw_connect(self) -> Any:
        """A spare connection, reset, if one is healthy; else a new one.

        It replaces the database's ``raw_connect``. The reset (ROLLBACK,
        ``DISCARD ALL``) is done here, in the thread that takes the
        connection, never where the ended thread's stores are finalized.
        """
        while True:
            with self._lock:
                if not self._idle:
                    break
                _, raw = self._idle.pop()  # the most recent: the least likely to be stale
            try:
                _reset_session(raw)
            except Exception:
                log.debug("a spare connection could not be reset; it is closed", exc_info=True)
                _close(raw)
            else:
                return raw
        return self._connect()

    def take_back(self, store: Store) -> bool:
        """Keep the connection of ``store``, whose thread ended; false if it is not kept.

        Nothing is sent: a connection that is closed, inside a transaction
        or beyond ``keep`` is not kept (the caller closes it); the next
        thread to take it resets it.
        """
        connection = store._connection
        raw = connection._raw_connection
        if raw is None or connection._state != STATE_CONNECTED or self.keep <= 0:
            return False
        if not _idle(raw):  # mid-transaction: closing it is how its locks go at once
            return False
        with self._lock:
            if len(self._idle) >= self.keep:
                return False
            self._idle.append((time.monotonic(), raw))
            self._schedule()
        connection._raw_connection = None  # the store's close() leaves it alone
        connection._closed = True
        return True

    def close(self) -> None:
        """Close every spare connection now."""
        with self._lock:
            idle, self._idle = self._idle, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for _, raw in idle:
            _close(raw)

    def _schedule(self) -> None:
        """Under the lock: have the oldest spare closed when it has waited too long."""
        if self._timer is None and self._idle:
            delay = max(0.0, self._idle[0][0] + self.timeout - time.monotonic())
            self._timer = threading.Timer(delay, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        deadline = time.monotonic() - self.timeout
        with self._lock:
            expired = [raw for handed, raw in self._idle if handed <= deadline]
            self._idle = [(handed, raw) for handed, raw in self._idle if handed > deadline]
            self._timer = None
            self._schedule()
        for raw in expired:
            _close(raw)

    def _after_fork(self) -> None:
        _inherited.extend(raw for _, raw in self._idle)
        self._idle = []
        self._lock = threading.Lock()
        self._timer = None


def install(database: Database, keep: int, timeout: float) -> SpareConnections | None:
    """Have ``database``'s threads hand their connections over (PostgreSQL only).

    Installed once per database; a later call changes ``keep`` and ``timeout``.
    """
    if not isinstance(database, Postgres):
        return None
    spare: SpareConnections | None = database.__dict__.get("_middlestorm_spare")
    if spare is None:
        spare = SpareConnections(database, keep, timeout)
        database._middlestorm_spare = spare
        database.raw_connect = spare.raw_connect
    spare.keep, spare.timeout = keep, timeout
    return spare


def hand_over(store: Store) -> bool:
    """Give the connection of a store whose thread ended to the next thread; false if not."""
    spare: SpareConnections | None = store._database.__dict__.get("_middlestorm_spare")
    return spare is not None and spare.take_back(store)


def connect_fresh(database: Database) -> Any:
    """A new raw connection to ``database``, never a spare one (which may have gone stale)."""
    spare: SpareConnections | None = database.__dict__.get("_middlestorm_spare")
    return spare._connect() if spare is not None else database.raw_connect()


def spare_count(database: Database) -> int:
    """How many spare connections ``database`` has waiting."""
    spare: SpareConnections | None = database.__dict__.get("_middlestorm_spare")
    return 0 if spare is None else len(spare)


def close_spares(database: Database) -> None:
    """Close the spare connections of ``database``, if it has any."""
    spare: SpareConnections | None = database.__dict__.get("_middlestorm_spare")
    if spare is not None:
        spare.close()


def _idle(raw: Any) -> bool:
    """Whether a connection is open and outside a transaction, as the client knows it."""
    from psycopg2.extensions import TRANSACTION_STATUS_IDLE

    try:
        return not raw.closed and raw.info.transaction_status == TRANSACTION_STATUS_IDLE
    except Exception:
        return False


def _reset_session(raw: Any) -> None:
    """End whatever the ended thread left in its session: ``DISCARD ALL`` releases
    advisory locks, drops temporary tables, prepared statements and LISTENs,
    and resets settings; the client encoding Storm set is set again."""
    if not _idle(raw):
        raise ConnectionError("the connection is closed or inside a transaction")
    raw.autocommit = True
    try:
        cursor = raw.cursor()
        cursor.execute("DISCARD ALL")
        cursor.execute("SET client_encoding TO 'UTF8'")
        cursor.close()
    finally:
        raw.autocommit = False


def _close(raw: Any) -> None:
    try:
        raw.close()
    except Exception:
        log.debug("closing a spare connection failed", exc_info=True)


def _forget_parent_connections() -> None:
    for pool in list(_pools):
        pool._after_fork()


def _close_all() -> None:
    for pool in list(_pools):
        pool.close()


os.register_at_fork(after_in_child=_forget_parent_connections)
atexit.register(_close_all)
