"""What reaches the database: statements and transaction ends (a Storm tracer), connections.

Storm's SQLite connection sends ``COMMIT`` and ``ROLLBACK`` as statements and
never calls the tracer's ``connection_commit``; PostgreSQL's calls it even when
nothing was sent since the last end. So a statement that is a COMMIT or
ROLLBACK counts as an end, and an end on a connection that sent nothing since
the previous one counts apart, as *empty* (PostgreSQL's driver sends nothing
for it).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

from storm.tracer import install_tracer, remove_tracer_type

_lock = threading.Lock()
_connections = 0
_patched = False


def count_connections() -> None:
    """Count every new database connection in this process (idempotent)."""
    global _patched
    with _lock:
        if _patched:
            return
        _patched = True
    classes: list[Any] = []
    from storm.databases.sqlite import SQLite

    classes.append(SQLite)
    try:
        from storm.databases.postgres import Postgres
    except ImportError:  # pragma: no cover - psycopg2 missing
        pass
    else:
        classes.append(Postgres)
    for cls in classes:
        original = cls.raw_connect

        def raw_connect(self: Any, _original: Any = original) -> Any:
            global _connections
            with _lock:
                _connections += 1
            return _original(self)

        cls.raw_connect = raw_connect


def connections_opened() -> int:
    """Connections opened in this process since :func:`count_connections`."""
    return _connections


@dataclass
class Counts:
    """Totals; subtract two snapshots for what happened in between."""

    statements: int = 0
    commits: int = 0
    rollbacks: int = 0
    empty_ends: int = 0
    connections: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class StatementTracer:
    """A Storm tracer that counts statements and the transaction ends that sent something."""

    def __init__(self) -> None:
        self.counts = Counts()
        self._lock = threading.Lock()

    def snapshot(self) -> Counts:
        with self._lock:
            return Counts(**{**self.counts.as_dict(), "connections": connections_opened()})

    def _end(self, connection: Any, kind: str) -> None:
        with self._lock:
            if getattr(connection, "_bench_pending", False):
                setattr(self.counts, kind, getattr(self.counts, kind) + 1)
            else:
                self.counts.empty_ends += 1
            connection._bench_pending = False

    def connection_raw_execute(
        self, connection: Any, raw_cursor: Any, statement: str, params: Any
    ) -> None:
        word = statement.lstrip()[:8].upper()
        if word.startswith("COMMIT"):
            self._end(connection, "commits")
        elif word.startswith("ROLLBACK"):
            self._end(connection, "rollbacks")
        else:
            with self._lock:
                self.counts.statements += 1
                connection._bench_pending = True

    def connection_commit(self, connection: Any, xid: Any = None) -> None:
        self._end(connection, "commits")

    def connection_rollback(self, connection: Any, xid: Any = None) -> None:
        self._end(connection, "rollbacks")


def install() -> StatementTracer:
    """Install a :class:`StatementTracer` (and the connection counter); :func:`uninstall` it."""
    count_connections()
    tracer = StatementTracer()
    install_tracer(tracer)
    return tracer


def uninstall() -> None:
    remove_tracer_type(StatementTracer)
