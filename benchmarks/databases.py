"""The benchmark's databases: a SQLite file in a temporary folder, and PostgreSQL.

PostgreSQL gets a role and a database of its own (``middlestorm_bench`` by
default), created on first use through an administrator connection. The role
is not a superuser and has a connection limit, so a benchmark that piles up
connections fails by itself instead of starving other users of the server.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storm.uri import URI

#: The one table every contender reads and writes.
TABLE = "bench_row"
DEFAULT_ROWS = 10_000
DEFAULT_POSTGRES = "postgres://middlestorm_bench@127.0.0.1:5432/middlestorm_bench"
DEFAULT_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
#: The bench role's connection limit (the server's max_connections is 100).
CONNECTION_LIMIT = 40
DEFAULT_SQLITE_OPTIONS = "timeout=30"

SCHEMA = (
    f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, body TEXT NOT NULL, "
    "counter INTEGER NOT NULL DEFAULT 0)"
)


@dataclass(frozen=True)
class Target:
    """A database the contenders run against: ``name`` is SQLite or PostgreSQL."""

    name: str
    uri: str

    @property
    def is_postgres(self) -> bool:
        return self.name == "PostgreSQL"

    def private_copy(self, name: str) -> Target:
        """SQLite: a copy of the database file for ``name`` alone (SQLite locks whole files,
        so a server that leaves a transaction open would stall the others); PostgreSQL: self."""
        if self.is_postgres:
            return self
        source = Path(URI(self.uri).database)
        copy = source.with_name(f"{source.stem}-{name}{source.suffix}")
        shutil.copyfile(source, copy)
        options = self.uri.partition("?")[2]
        return Target(self.name, f"sqlite:{copy}" + (f"?{options}" if options else ""))

    def tagged(self, tag: str) -> str:
        """The URI with an ``application_name`` (PostgreSQL only), to find its sessions."""
        if not self.is_postgres:
            return self.uri
        return f"{self.uri}{'&' if '?' in self.uri else '?'}application_name={tag}"


def _pg_connect(dsn: str):  # -> psycopg2 connection
    import psycopg2

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    return connection


def postgres_dsn(uri: str) -> str:
    """A libpq conninfo string for a Storm ``postgres://`` URI."""
    parsed = URI(uri)
    parts = {
        "host": parsed.host or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database,
    }
    return " ".join(f"{key}={value}" for key, value in parts.items() if value)


def ensure_postgres(uri: str, admin: str) -> None:
    """Create the URI's role (not a superuser, limited) and database if missing."""
    import psycopg2
    from psycopg2 import sql

    try:
        _pg_connect(postgres_dsn(uri)).close()
        return
    except psycopg2.OperationalError:
        pass
    parsed = URI(uri)
    role, database = parsed.username, parsed.database
    connection = _pg_connect(admin)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        if cursor.fetchone() is None:
            cursor.execute(
                sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT {}").format(
                    sql.Identifier(role), sql.Literal(CONNECTION_LIMIT)
                )
            )
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if cursor.fetchone() is None:
            cursor.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(database), sql.Identifier(role)
                )
            )
    connection.close()


def seed(target: Target, rows: int) -> None:
    """(Re)create the table with ``rows`` rows: ``row 1``, ``row 2``, …"""
    if target.is_postgres:
        connection = _pg_connect(postgres_dsn(target.uri))
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
            cursor.execute(SCHEMA)
            cursor.execute(
                f"INSERT INTO {TABLE} (id, body) "
                "SELECT n, 'row ' || n FROM generate_series(1, %s) AS n",
                (rows,),
            )
            cursor.execute(f"VACUUM ANALYZE {TABLE}")
        connection.close()
        return
    path = URI(target.uri).database
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
        connection.execute(SCHEMA)
        connection.executemany(
            f"INSERT INTO {TABLE} (id, body) VALUES (?, ?)",
            ((number, f"row {number}") for number in range(1, rows + 1)),
        )
    connection.close()


def open_sessions(target: Target, tag: str, admin: str) -> int:
    """How many sessions with ``application_name`` ``tag`` PostgreSQL has open now."""
    connection = _pg_connect(admin)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (tag,)
            )
            return int(cursor.fetchone()[0])
    finally:
        connection.close()


@contextmanager
def targets(
    names: list[str], postgres: str, admin: str, rows: int, sqlite_options: str
) -> Iterator[list[Target]]:
    """The databases named (``sqlite``, ``postgres``), seeded; the SQLite folder goes after."""
    folder = Path(tempfile.mkdtemp(prefix="middlestorm-bench-"))
    try:
        found = []
        for name in names:
            if name == "sqlite":
                options = f"?{sqlite_options}" if sqlite_options else ""
                found.append(Target("SQLite", f"sqlite:{folder / 'bench.db'}{options}"))
            else:
                ensure_postgres(postgres, admin)
                found.append(Target("PostgreSQL", postgres))
        for target in found:
            seed(target, rows)
        yield found
    finally:
        shutil.rmtree(folder, ignore_errors=True)
