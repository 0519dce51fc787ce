"""Connections that outlive short threads.

A server that runs every request in a new thread (werkzeug's development
server, ``socketserver.ThreadingMixIn``) would open a PostgreSQL connection
per request: a store belongs to its thread, and its connection is closed when
the thread ends. Instead, a thread that ends hands its connection over, if
it is idle, to the next thread that opens one for the same database. Once a
thread has ended after one request, and while no thread has served two, a
thread hands it over as soon as its request ends
(:meth:`StoreRegistry.request_ended`), since the next request's thread may
start before this one ends. A thread of the pool's own resets
it at once (``DISCARD ALL``: no advisory lock, temporary table, LISTEN or
setting of the ended thread's session is left); one that fails the reset is
closed. A connection whose thread ended
inside a transaction is closed, so that its locks go at once.

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

from storm.database import STATE_CONNECTED, STATE_RECONNECT, Database
from storm.databases.postgres import Postgres
from storm.store import Store

__all__ = [
    "SpareConnections",
    "close_spares",
    "connect_fresh",
    "hand_over",
    "install",
    "release",
    "reopen_later",
    "spare_count",
]

log = logging.getLogger(__name__)

#: Where a database keeps its spare connections.
_ATTRIBUTE = "_middlestorm_spare"
#: Seconds a thread opening a connection waits for a spare being reset.
RESET_WAIT = 1.0

_pools: weakref.WeakSet[SpareConnections] = weakref.WeakSet()
#: Connections inherited across fork(): the parent's sessions, never closed here.
_inherited: list[Any] = []


class SpareConnections:
    """The idle connections of ended threads, for one database.

    A connection handed over is reset (:func:`_reset_session`) by a thread of
    the pool's own, the janitor, soon after, or by the thread that takes it
    first; the janitor also closes those kept longer than ``timeout``.
    """

    def __init__(self, database: Database, keep: int, timeout: float) -> None:
        self.keep = keep
        self.timeout = timeout
        self._connect = database.raw_connect
        #: (handed over at, raw connection): reset and ready, and not reset yet.
        self._ready: list[tuple[float, Any]] = []
        self._dirty: list[tuple[float, Any]] = []
        #: How many the janitor is resetting, and how many times close() was called.
        self._resetting = 0
        self._closings = 0
        self._lock = threading.Condition()
        self._janitor: threading.Thread | None = None
        _pools.add(self)

    def __len__(self) -> int:
        return len(self._ready) + len(self._dirty) + self._resetting

    def raw_connect(self) -> Any:
        """A spare connection if one is healthy (reset first if need be); else a new one.

        It replaces the database's ``raw_connect``.
        """
        while True:
            with self._lock:
                deadline = time.monotonic() + RESET_WAIT
                while not self._ready and not self._dirty and self._resetting:
                    # being reset: a round trip or two away, sooner than a new connection
                    if not self._lock.wait(max(0.0, deadline - time.monotonic())):
                        break
                if self._ready:
                    _, raw = self._ready.pop()  # the most recent: the least likely stale
                    ready = True
                elif self._dirty:
                    _, raw = self._dirty.pop()
                    ready = False
                else:
                    break
            try:
                if ready and not _idle(raw):
                    raise ConnectionError("the connection is closed or inside a transaction")
                if not ready:
                    _reset_session(raw)
            except Exception:
                log.debug("a spare connection is unusable; it is closed", exc_info=True)
                _close(raw)
            else:
                return raw
        return self._connect()

    def take_back(self, store: Store) -> bool:
        """Keep the connection of ``store``, whose thread ended; false if it is not kept.

        Nothing is sent from here (the ended thread's stores may be finalized
        anywhere): a connection that is closed, inside a transaction or
        beyond ``keep`` is not kept (the caller closes it); the janitor
        resets the others.
        """
        connection = store._connection
        raw = connection._raw_connection
        if raw is None or connection._state != STATE_CONNECTED or self.keep <= 0:
            return False
        if not _idle(raw):  # mid-transaction: closing it is how its locks go at once
            return False
        with self._lock:
            if len(self) >= self.keep:
                return False
            self._dirty.append((time.monotonic(), raw))
            self._wake()
        connection._raw_connection = None  # the store's close() leaves it alone
        connection._closed = True
        return True

    def close(self) -> None:
        """Close every spare connection now."""
        with self._lock:
            spares = self._ready + self._dirty
            self._ready, self._dirty = [], []
            self._closings += 1  # those being reset are closed by the janitor
            self._lock.notify_all()
        for _, raw in spares:
            _close(raw)

    def _wake(self) -> None:
        """Under the lock: have the janitor look at the spares."""
        if self._janitor is None or not self._janitor.is_alive():
            self._janitor = threading.Thread(
                target=self._tidy, name="middlestorm-spare-connections", daemon=True
            )
            self._janitor.start()
        self._lock.notify_all()

    def _tidy(self) -> None:
        """The janitor: reset spares handed over, close those kept too long; end when none."""
        while True:
            with self._lock:
                while not self._dirty and self._ready:
                    wait = self._ready[0][0] + self.timeout - time.monotonic()
                    if wait <= 0:
                        break
                    self._lock.wait(wait)
                if not self._dirty and not self._ready:
                    self._janitor = None
                    return
                dirty, self._dirty = self._dirty, []
                self._resetting, closings = len(dirty), self._closings
                deadline = time.monotonic() - self.timeout
                expired = [raw for handed, raw in self._ready if handed <= deadline]
                self._ready = [(handed, raw) for handed, raw in self._ready if handed > deadline]
            for raw in expired:
                _close(raw)
            for handed, raw in dirty:
                try:
                    _reset_session(raw)
                except Exception:
                    log.debug("a spare connection could not be reset; it is closed", exc_info=True)
                    usable = False
                else:
                    usable = True
                with self._lock:
                    self._resetting -= 1
                    usable = usable and closings == self._closings
                    if usable:
                        self._ready.append((handed, raw))
                        self._ready.sort(key=lambda spare: spare[0])
                    self._lock.notify_all()
                if not usable:
                    _close(raw)

    def _after_fork(self) -> None:
        _inherited.extend(raw for _, raw in self._ready + self._dirty)
        self._ready, self._dirty = [], []
        self._resetting = 0
        self._lock = threading.Condition()
        self._janitor = None


def install(database: Database, keep: int, timeout: float) -> SpareConnections | None:
    """Have ``database``'s threads hand their connections over (PostgreSQL only).

    Installed once per database; a later call changes ``keep`` and ``timeout``.
    """
    if not isinstance(database, Postgres):
        return None
    spare = _spare_of(database)
    if spare is None:
        spare = SpareConnections(database, keep, timeout)
        database.__dict__[_ATTRIBUTE] = spare
        database.raw_connect = spare.raw_connect
    spare.keep, spare.timeout = keep, timeout
    return spare


def hand_over(store: Store) -> bool:
    """Give the connection of a store whose thread ended to the next thread; false if not."""
    spare = _spare_of(store._database)
    return spare is not None and spare.take_back(store)


def release(store: Store) -> bool:
    """Give the idle connection of a live store to the next thread now; false if not.

    The store connects again, taking a spare connection first, when it is next
    used.
    """
    spare = _spare_of(store._database)
    if spare is None or not spare.take_back(store):
        return False
    reopen_later(store)
    return True


def reopen_later(store: Store) -> None:
    """Let a store whose connection was closed connect again when next used (Storm
    refuses a closed connection for good)."""
    connection = store._connection
    connection._closed = False
    connection._state = STATE_RECONNECT


def connect_fresh(database: Database) -> Any:
    """A new raw connection to ``database``, never a spare one (which may have gone stale)."""
    spare = _spare_of(database)
    return spare._connect() if spare is not None else database.raw_connect()


def spare_count(database: Database) -> int:
    """How many spare connections ``database`` has waiting."""
    spare = _spare_of(database)
    return 0 if spare is None else len(spare)


def close_spares(database: Database) -> None:
    """Close the spare connections of ``database``, if it has any."""
    spare = _spare_of(database)
    if spare is not None:
        spare.close()


def _spare_of(database: Database) -> SpareConnections | None:
    """The spare connections :func:`install` gave ``database``, if any."""
    spare: SpareConnections | None = database.__dict__.get(_ATTRIBUTE)
    return spare


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
    del raw.notices[:]  # what the server told the ended thread is not the next one's
    del raw.notifies[:]


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
