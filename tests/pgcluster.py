"""A PostgreSQL 15 cluster of the test session's own, to restart and break.

The fault tests (``tests/test_faults.py``) and ``benchmarks/soak.py`` stop the
database, terminate its backends and time out its idle sessions: nothing the
shared server on 5432, which other sessions use, may ever see. So a session
makes a cluster of its own with postgresql-common (``pg_createcluster``), on a
free port from 5400 to 5599, listening on 127.0.0.1 only, with trust
authentication, and drops it at the end (``pg_dropcluster --stop``). Making one
takes about 1.5 s, once per session.

It needs postgresql-common, PostgreSQL 15 and root (``pg_createcluster``, and
``pg_ctl`` run as the ``postgres`` user through ``runuser``). Without them the
tests that use it skip, except under ``CI=true``, where they fail, as
``tests/conftest.py``'s ``require_postgres`` does for the shared server.

A cluster is named after the process that made it (``middlestorm_faults_<pid>``),
so that sessions running side by side have one each; one left behind by a
process that is gone (a crashed run) is dropped before a new one is made.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VERSION = "15"
PREFIX = "middlestorm_faults_"
OTHER_PREFIX = "middlestorm_other_"
PORTS = range(5400, 5600)
BINDIR = Path(f"/usr/lib/postgresql/{VERSION}/bin")
#: Seconds any one cluster command may take.
COMMAND_TIMEOUT = 60

#: What the fault suite needs of its cluster, written to its conf.d.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "ssl": "off",
    "max_connections": "100",
    # For the two-phase commit tests: PREPARE TRANSACTION needs slots.
    "max_prepared_transactions": "20",
    # Durability across a crash of the machine is not under test, and a
    # restart (fast or immediate) loses nothing with fsync off: the kernel
    # keeps what was written. It makes CREATE DATABASE and commits cheap.
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "shared_buffers": "32MB",
    "log_line_prefix": "'%m [%p] %q%a@%d '",
}


class ClusterError(RuntimeError):
    """A postgresql-common or pg_ctl command failed."""


def _command(*args: str) -> str:
    try:
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise ClusterError(f"{' '.join(args)} took over {COMMAND_TIMEOUT} s") from error
    if done.returncode != 0:
        raise ClusterError(
            f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def why_no_cluster() -> str | None:
    """None when this process can make a cluster of its own, else why not."""
    if os.geteuid() != 0:
        return "making a PostgreSQL cluster of the tests' own needs root"
    for tool in ("pg_createcluster", "pg_dropcluster", "pg_lsclusters", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (postgresql-common, util-linux)"
    if not (BINDIR / "pg_ctl").exists():
        return f"PostgreSQL {VERSION} is not installed ({BINDIR / 'pg_ctl'} is missing)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed"
    return None


def clusters() -> list[dict]:
    """postgresql-common's clusters, as ``pg_lsclusters --json`` lists them."""
    return json.loads(_command("pg_lsclusters", "--json") or "[]")


def _process_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"python" in cmdline  # a pid reused by something else is not its maker


def drop_stale_clusters(prefix: str, keep: str | None = None) -> list[str]:
    """Drop the clusters named ``<prefix><pid>`` whose process is gone; their names."""
    dropped = []
    for info in clusters():
        name = info["cluster"]
        match = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
        if str(info["version"]) != VERSION or match is None or name == keep:
            continue
        if int(match.group(1)) == os.getpid() or not _process_alive(int(match.group(1))):
            _command("pg_dropcluster", "--stop", VERSION, name)
            dropped.append(name)
    return dropped


def _free_port(taken: set[int]) -> int:
    candidates = [port for port in PORTS if port not in taken]
    random.shuffle(candidates)  # sessions starting together rarely pick the same one
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise ClusterError(f"no free port from {PORTS.start} to {PORTS.stop - 1}")


@dataclass
class Outage:
    """When the database went down and came back, by ``time.monotonic()``."""

    began: float
    stopped: float
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.began


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster made for this process, and what the fault tests do to it."""

    name: str
    port: int
    pgdata: str
    configdir: str
    logfile: str

    @classmethod
    def create(cls, prefix: str = PREFIX, settings: dict[str, str] | None = None):
        """Make and start a cluster named ``<prefix><pid>``, after dropping stale ones."""
        name = f"{prefix}{os.getpid()}"
        drop_stale_clusters(prefix)
        for _ in range(5):
            taken = {int(info["port"]) for info in clusters() if info.get("port")}
            port = _free_port(taken)
            _command(
                "pg_createcluster", VERSION, name, "--port", str(port), "--start-conf", "manual",
                "--", "--auth-local=trust", "--auth-host=trust",
            )  # fmt: skip
            info = next(info for info in clusters() if info["cluster"] == name)
            cluster = cls(name, port, info["pgdata"], info["configdir"], info["logfile"])
            conf = Path(cluster.configdir) / "conf.d" / "middlestorm.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            lines = [f"{key} = {value}" for key, value in {**SETTINGS, **(settings or {})}.items()]
            conf.write_text("\n".join(lines) + "\n")
            try:
                cluster.start()
            except ClusterError:
                cluster.drop()  # most likely another process took the port meanwhile
                if _port_in_use(port):
                    continue
                raise
            return cluster
        raise ClusterError("could not start a cluster: every port tried was taken meanwhile")

    # -- life cycle ------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        _command("runuser", "-u", "postgres", "--", str(BINDIR / "pg_ctl"), *args)

    def start(self) -> None:
        """Start the server and wait until it takes connections (about 0.1 s)."""
        Path("/var/run/postgresql").mkdir(exist_ok=True)
        shutil.chown("/var/run/postgresql", "postgres", "postgres")
        config = f"-c config_file={self.configdir}/postgresql.conf"
        self._pg_ctl("start", "-w", "-s", "-D", self.pgdata, "-l", self.logfile, "-o", config)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``fast`` ends sessions cleanly, ``immediate`` as a crash does."""
        self._pg_ctl("stop", "-w", "-s", "-m", mode, "-D", self.pgdata)

    def running(self) -> bool:
        return any(info["cluster"] == self.name and info["running"] for info in clusters())

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def restart(self, down: float = 1.0, mode: str = "fast") -> Outage:
        """Stop the server, keep it down ``down`` seconds, start it again."""
        began = time.monotonic()
        self.stop(mode)
        stopped = time.monotonic()
        time.sleep(down)
        self.start()
        return Outage(began, stopped, time.monotonic())

    def drop(self) -> None:
        _command("pg_dropcluster", "--stop", VERSION, self.name)

    # -- SQL -------------------------------------------------------------------

    def uri(self, database: str = "postgres", **options: str) -> str:
        """A Storm URI for ``database`` on this cluster."""
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}" + (
            f"?{query}" if query else ""
        )

    def connect(self, database: str = "postgres"):
        """A psycopg2 connection in autocommit mode."""
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname=database,
            connect_timeout=5,
            application_name="middlestorm-tests-side-door",
        )
        connection.autocommit = True
        return connection

    def query(self, statement: str, *params, database: str = "postgres") -> list[tuple]:
        connection = self.connect(database)
        try:
            cursor = connection.cursor()
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def terminate(self, application_name: str) -> int:
        """End every session of ``application_name`` now, as an administrator would.

        Their clients get "terminating connection due to administrator
        command" (SQLSTATE 57P01) on their next use. Returns how many ended.
        """
        return self.query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
            "FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
            application_name,
        )[0][0]

    def sessions(self, application_name: str) -> list[int]:
        """The backend pids of ``application_name``'s open sessions."""
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            application_name,
        )
        return [pid for (pid,) in rows]

    def set_idle_session_timeout(self, database: str, timeout: str) -> None:
        """Have the server end sessions of ``database`` idle (outside a transaction)
        for longer than ``timeout`` (``'500ms'``, ``'0'`` for never).

        It holds for sessions opened afterwards: PostgreSQL reads it when a
        session starts.
        """
        self.query(f"ALTER DATABASE {_identifier(database)} SET idle_session_timeout = %s", timeout)

    def create_database(self, tables: bool = True) -> ClusterDatabase:
        """A new database, with the tests' ``note``, ``tag`` and ``counter`` tables unless
        ``tables`` is false (the example app makes its own)."""
        database = ClusterDatabase(self)
        self.query(f"CREATE DATABASE {database.name}")
        if tables:
            from tests.conftest import SCHEMA  # conftest imports this module

            database.run(*SCHEMA["postgres"])
        return database


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@dataclass
class ClusterDatabase:
    """One test's database on the private cluster, and a side door to what is committed."""

    cluster: PrivateCluster
    name: str = field(default_factory=lambda: f"faults_{uuid.uuid4().hex[:12]}")

    @property
    def application_name(self) -> str:
        """What the application's sessions call themselves: the test's own name."""
        return self.name.replace("_", "-")

    def uri(self, **options: str) -> str:
        """The application's Storm URI: its sessions carry :attr:`application_name`."""
        return self.cluster.uri(self.name, application_name=self.application_name, **options)

    def run(self, *statements: str) -> None:
        connection = self.cluster.connect(self.name)
        try:
            connection.autocommit = False
            cursor = connection.cursor()
            for statement in statements:
                cursor.execute(statement)
            connection.commit()
        finally:
            connection.close()

    def query(self, statement: str, *params) -> list[tuple]:
        return self.cluster.query(statement, *params, database=self.name)

    def notes(self) -> list[str]:
        """The bodies of the committed notes, oldest first."""
        return [body for (body,) in self.query("SELECT body FROM note ORDER BY id")]

    def counters(self) -> list[int]:
        """The committed values of the counters, by id."""
        return [value for (value,) in self.query("SELECT value FROM counter ORDER BY id")]

    def sessions(self) -> list[int]:
        """The backend pids of the application's open sessions."""
        return self.cluster.sessions(self.application_name)

    def idle_in_transaction(self) -> int:
        """The application's sessions left inside a transaction."""
        return self.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state LIKE 'idle in transaction%%'",
            self.application_name,
        )[0][0]

    def drop(self) -> None:
        self.cluster.query(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def require_cluster() -> None:
    """Skip, or fail under CI, when this process cannot make a cluster of its own."""
    problem = why_no_cluster()
    if problem is None:
        return
    from tests.conftest import IN_CI  # conftest imports this module

    if IN_CI:
        pytest.fail(f"{problem}; CI must run the fault tests")
    pytest.skip(problem)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PrivateCluster]:
    """A PostgreSQL 15 cluster of the session's own, dropped at the end."""
    require_cluster()
    cluster = PrivateCluster.create()
    try:
        yield cluster
    finally:
        cluster.drop()


@pytest.fixture(scope="session")
def other_cluster() -> Iterator[PrivateCluster]:
    """A second cluster of the session's own, for a database that fails on its own."""
    require_cluster()
    cluster = PrivateCluster.create(prefix=OTHER_PREFIX)
    try:
        yield cluster
    finally:
        cluster.drop()


@pytest.fixture
def cluster_db(pg_cluster: PrivateCluster) -> Iterator[ClusterDatabase]:
    """A new database on the private cluster with the tests' tables, dropped afterwards."""
    pg_cluster.ensure_running()  # an earlier test may have left it down
    database = pg_cluster.create_database()
    yield database
    pg_cluster.ensure_running()
    database.drop()


@pytest.fixture
def cluster_empty_db(pg_cluster: PrivateCluster) -> Iterator[ClusterDatabase]:
    """A new database on the private cluster without tables (for the example app)."""
    pg_cluster.ensure_running()
    database = pg_cluster.create_database(tables=False)
    yield database
    pg_cluster.ensure_running()
    database.drop()
