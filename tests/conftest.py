"""Fixtures: the same tests run against SQLite and the local PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import transaction
from storm.tracer import install_tracer, remove_tracer

#: pytester runs pytest sessions of their own; middlestorm.testing is what users get.
pytest_plugins = ["pytester", "middlestorm.testing"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: The server the PostgreSQL tests use; each test session makes a database
#: of its own there, so that sessions may run side by side.
SERVER_URI = os.environ.get("MIDDLESTORM_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
SESSION_DATABASE = f"middlestorm_test_{os.getpid()}"
POSTGRES_URI = f"{SERVER_URI.rsplit('/', 1)[0]}/{SESSION_DATABASE}"
_session_database_lock = threading.Lock()
_session_database_made = False


def libpq(uri: str) -> str:
    """A Storm ``postgres://`` URI as libpq spells it."""
    return uri.replace("postgres://", "postgresql://", 1)


def _server_run(statement: str) -> None:
    import psycopg2

    connection = psycopg2.connect(libpq(SERVER_URI), connect_timeout=5)
    try:
        connection.autocommit = True
        connection.cursor().execute(statement)
    finally:
        connection.close()


def session_database() -> None:
    """Create this session's PostgreSQL database on first use."""
    global _session_database_made
    with _session_database_lock:
        if not _session_database_made:
            _server_run(f"DROP DATABASE IF EXISTS {SESSION_DATABASE} WITH (FORCE)")
            _server_run(f"CREATE DATABASE {SESSION_DATABASE}")
            _session_database_made = True


def pytest_sessionfinish(session, exitstatus) -> None:
    if _session_database_made:
        _server_run(f"DROP DATABASE IF EXISTS {SESSION_DATABASE} WITH (FORCE)")


SCHEMA = {
    "sqlite": [
        "CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
        "CREATE TABLE tag (id INTEGER PRIMARY KEY, note_id INTEGER NOT NULL"
        " REFERENCES note (id) DEFERRABLE INITIALLY DEFERRED)",
        "CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO counter VALUES (1, 0), (2, 0), (3, 0), (4, 0), (5, 0)",
    ],
    "postgres": [
        "SET lock_timeout = '10s'",
        "DROP TABLE IF EXISTS tag, note, counter",
        "CREATE TABLE note (id SERIAL PRIMARY KEY, body TEXT NOT NULL)",
        "CREATE TABLE tag (id SERIAL PRIMARY KEY, note_id INTEGER NOT NULL"
        " REFERENCES note (id) DEFERRABLE INITIALLY DEFERRED)",
        "CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO counter VALUES (1, 0), (2, 0), (3, 0), (4, 0), (5, 0)",
    ],
}


@dataclass
class Database:
    """A test database, and a side door to see what is really committed in it."""

    kind: str
    uri: str
    path: str = ""
    name: str = field(default_factory=lambda: f"middlestorm-{uuid.uuid4().hex[:12]}")

    def connect(self):
        if self.kind == "sqlite":
            return sqlite3.connect(self.path, timeout=10)
        import psycopg2

        return psycopg2.connect(libpq(POSTGRES_URI))

    def run(self, *statements: str) -> None:
        connection = self.connect()
        try:
            cursor = connection.cursor()
            for statement in statements:
                cursor.execute(statement)
            connection.commit()
        finally:
            connection.close()

    def query(self, statement: str, *params) -> list[tuple]:
        connection = self.connect()
        try:
            cursor = connection.cursor()
            cursor.execute(statement, params)
            return cursor.fetchall()
        finally:
            connection.close()

    def counters(self) -> list[int]:
        """The committed values of the five counters, by id."""
        return [row[0] for row in self.query("SELECT value FROM counter ORDER BY id")]

    def notes(self) -> list[str]:
        """The bodies of the committed notes, oldest first."""
        return [row[0] for row in self.query("SELECT body FROM note ORDER BY id")]

    def idle_in_transaction(self) -> int:
        """PostgreSQL sessions of this test's stores left inside a transaction (0 on SQLite)."""
        if self.kind != "postgres":
            return 0
        return self.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state LIKE 'idle in transaction%%'",
            self.name,
        )[0][0]

    @contextmanager
    def dying_at_commit(self) -> Iterator[str]:
        """Inside: a note with the body this yields ends its backend during the COMMIT.

        A deferred trigger makes the server end the session while it commits,
        so the client loses the connection with the COMMIT under way.
        """
        self.run(
            "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$",
            "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON note "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.body = 'die') "
            "EXECUTE FUNCTION die()",
        )
        try:
            yield "die"
        finally:
            self.run("DROP TRIGGER die_at_commit ON note", "DROP FUNCTION die()")

    def backends(self) -> int:
        """How many server connections this test's stores hold open."""
        assert self.kind == "postgres", "only PostgreSQL counts its connections"
        return self.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", self.name
        )[0][0]


def postgres_available() -> str | None:
    """None when the PostgreSQL server answers, else why not."""
    try:
        import psycopg2

        psycopg2.connect(libpq(SERVER_URI), connect_timeout=5).close()
        session_database()
    except Exception as error:
        return f"{type(error).__name__}: {error}".strip()
    return None


def make_database(kind: str, tmp_path, *, tables: bool = True) -> Database:
    """An empty database, with the ``note`` and ``tag`` tables unless ``tables`` is false."""
    if kind == "sqlite":
        tmp_path.mkdir(parents=True, exist_ok=True)
        path = str(tmp_path / "test.db")
        database = Database("sqlite", f"sqlite:{path}?foreign_keys=ON&timeout=10", path)
    else:
        require_postgres()
        database = Database("postgres", "")
        separator = "&" if "?" in POSTGRES_URI else "?"
        database.uri = f"{POSTGRES_URI}{separator}application_name={database.name}"
    if tables:
        database.run(*SCHEMA[database.kind])
    elif kind == "postgres":
        database.run("SET lock_timeout = '10s'", "DROP TABLE IF EXISTS tag, note, counter, patch")
    return database


@pytest.fixture
def registry(db):
    """A StoreRegistry on the test database; this thread's stores are closed afterwards."""
    from middlestorm import StoreRegistry

    made = StoreRegistry({"main": db.uri})
    yield made
    transaction.abort()
    made.release()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path) -> Database:
    """An empty test database, on SQLite and on PostgreSQL."""
    return make_database(request.param, tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request, tmp_path) -> Database:
    """A test database without tables, on SQLite and on PostgreSQL."""
    return make_database(request.param, tmp_path, tables=False)


@pytest.fixture
def pg(tmp_path) -> Database:
    """An empty test database on PostgreSQL, for what only PostgreSQL can show."""
    return make_database("postgres", tmp_path)


def _middlewares(db: Database) -> Iterator:
    made: list = []

    def make(app, **options):
        from middlestorm import MiddleStorm

        made.append(MiddleStorm(app, db.uri, **options))
        return made[-1]

    yield make
    transaction.manager.abort()
    for each in made:
        each.registry.release()


@pytest.fixture
def middleware(db):
    """Make a MiddleStorm on the test database; this thread's stores are closed afterwards."""
    yield from _middlewares(db)


@pytest.fixture
def pg_middleware(pg):
    """Make a MiddleStorm on the PostgreSQL test database; its stores are closed afterwards."""
    yield from _middlewares(pg)


def require_postgres() -> None:
    problem = postgres_available()
    if problem is None:
        return
    message = f"PostgreSQL at {SERVER_URI} is not reachable ({problem})"
    if IN_CI:
        pytest.fail(f"{message}; CI must run the PostgreSQL tests")
    pytest.skip(message)


class CountingTracer:
    """A Storm tracer recording what Storm sends to the database.

    ``statements`` leaves out BEGIN, COMMIT and ROLLBACK, which Storm's SQLite
    backend sends as statements and its PostgreSQL backend as driver calls;
    ``commits`` and ``rollbacks`` count those, on either backend; ``raw``
    counts every statement sent, BEGIN and COMMIT included.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.statements: list[str] = []
        self.commits = self.rollbacks = self.raw = 0

    def connection_raw_execute(self, connection, raw_cursor, statement, params) -> None:
        self.raw += 1
        if statement == "COMMIT":
            self.commits += 1
        elif statement == "ROLLBACK":
            self.rollbacks += 1
        elif statement != "BEGIN":
            self.statements.append(statement.split(None, 1)[0].upper())

    def seen(self) -> tuple[list[str], int, int]:
        return list(self.statements), self.commits, self.rollbacks

    def connection_commit(self, connection, xid=None) -> None:
        self.commits += 1

    def connection_rollback(self, connection, xid=None) -> None:
        self.rollbacks += 1


@pytest.fixture
def tracer() -> Iterator[CountingTracer]:
    counting = CountingTracer()
    install_tracer(counting)
    yield counting
    remove_tracer(counting)


@pytest.fixture(autouse=True)
def _no_transaction_left_behind() -> Iterator[None]:
    transaction.manager.abort()
    yield
    transaction.manager.abort()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "pg" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


# The private clusters' fixtures, shared by every module that uses them (a
# session fixture defined in two modules would make its cluster twice).
from tests.pgcluster import (  # noqa: E402
    cluster_db,
    cluster_empty_db,
    other_cluster,
    pg_cluster,
)

__all__ = ["cluster_db", "cluster_empty_db", "other_cluster", "pg_cluster"]
