"""Faults a deployment meets, against real servers and a PostgreSQL cluster of the suite's own.

The database restarts, an administrator terminates the app's sessions, the
server times out idle ones, concurrent requests conflict, clients leave
halfway: each under a real server process (gunicorn's gthread worker), over
real sockets. The cluster is ``tests/pgcluster.py``'s: the shared server is
never stopped or touched. Every scenario is bounded in requests and seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fault_app import Reply, call, post_json
from tests.servers import Score, Server, request, start_server

pytestmark = [pytest.mark.postgres, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

#: The retry log line middlestorm writes on ``middlestorm.work`` at INFO.
RETRY_LINE = "transient error in attempt"
#: What middlestorm logs at ERROR for a COMMIT whose connection was lost (a 500).
IN_DOUBT = "COMMIT is in doubt"
THREAD_ERRORS = ("created in a thread", "WrongThreadError", "registered with another thread")


def gunicorn(app: str, *, workers: int = 2, threads: int = 4, access_log: bool = False):
    """gunicorn's gthread worker serving ``app``; no access log unless asked."""
    return [
        "{python}", "-m", "gunicorn", "-k", "gthread", "--threads", str(threads),
        "-w", str(workers), "-b", "127.0.0.1:{port}",
        *(["--access-logfile", "-"] if access_log else []), app,
    ]  # fmt: skip


@pytest.fixture
def serve(tmp_path) -> Iterator:
    """Start a server (stopped afterwards); ``serve(command, db_uri)``."""
    started: list[Server] = []

    def start(command: list[str], db_uri: str) -> Server:
        started.append(start_server(command, db_uri, tmp_path / f"server{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()
        for error in THREAD_ERRORS:
            assert error not in server.output, server.output


def database_sockets(pid: int, port: int) -> int:
    """How many TCP connections to ``port`` (the database's) process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:  # the process is gone
        return 0
    count = 0
    for line in table:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
            count += 1
    return count


def wait_for_workers(server: Server, db, workers: int, timeout: float = 30) -> None:
    """Wait until each gunicorn worker has imported the app and served a request:
    the load must not meet a worker still booting (see
    ``test_a_worker_started_while_the_database_is_down_leaves_the_server_up``)."""
    deadline = time.monotonic() + timeout
    while True:
        with ThreadPoolExecutor(4) as pool:  # requests spread over the workers
            list(pool.map(lambda _: request(server.base_url + "/api/notes/1"), range(4)))
        pids = children(server.process.pid)
        # The schema upgrade's session, and one of a thread that served a request.
        if len(pids) == workers and all(
            database_sockets(pid, db.cluster.port) >= 2 for pid in pids
        ):
            return
        assert time.monotonic() < deadline, f"{workers} workers did not start in {timeout} s"


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (a gunicorn master's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def report(**figures) -> None:
    """Print a test's figures (``pytest -s`` or ``-rP`` shows them)."""
    print("figures:", ", ".join(f"{name}={value}" for name, value in figures.items()))


# -- clients writing notes through the example app, keeping score by time -----------------


@dataclass
class Outcome:
    """One request a client made, timed with ``time.monotonic()``."""

    started: float
    ended: float
    kind: str  # "write" or "read"
    body: str
    status: int | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class NoteClients:
    """Client threads writing notes to the example app's JSON API and reading each back,
    until stopped or ``per_client`` notes each."""

    def __init__(self, base_url: str, clients: int = 4, per_client: int = 400) -> None:
        self.base_url = base_url
        self.per_client = per_client
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)
        ]

    def __enter__(self) -> NoteClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self, number: int) -> None:
        for index in range(self.per_client):
            if self._stop.is_set():
                return
            body = f"client {number} note {index}"
            started = time.monotonic()
            status, note = request(self.base_url + "/api/notes", {"body": body})
            self._record(Outcome(started, time.monotonic(), "write", body, status))
            if status == 201 and isinstance(note, dict):
                started = time.monotonic()
                status, read = request(f"{self.base_url}/api/notes/{note['id']}")
                if status == 200 and (not isinstance(read, dict) or read.get("body") != body):
                    status = -1  # a read that did not return what was written
                self._record(Outcome(started, time.monotonic(), "read", body, status))

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def wait(self, *, writes: int = 0, until: float = 0.0, timeout: float = 30) -> None:
        """Let the clients run until ``writes`` writes succeeded and ``until`` has passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = sum(o.ok for o in self.writes())
            if done >= writes and time.monotonic() >= until:
                return
            time.sleep(0.02)
        raise AssertionError(f"the clients made {done} writes in {timeout} s, not {writes}")

    def writes(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.kind == "write"]

    def score(self) -> Score:
        """2xx: saved; 400 or 503 (out of attempts): refused, so never committed;
        a 500 (a COMMIT in doubt) or no answer: unknown either way."""
        score = Score()
        for outcome in self.writes():
            if outcome.ok:
                score.saved.add(outcome.body)
            elif outcome.status in (400, 503):
                score.refused.add(outcome.body)
            else:
                score.unanswered.add(outcome.body)
        return score

    def in_doubt(self, committed: list[str]) -> tuple[int, int]:
        """Writes answered 500 (a COMMIT in doubt), and how many of them were committed."""
        bodies = {o.body for o in self.writes() if o.status == 500}
        return len(bodies), len(bodies & set(committed))

    def failed(self, *, started_after: float = float("-inf")) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if not o.ok and o.started > started_after]


def statuses(outcomes: list[Outcome]) -> dict:
    return dict(Tally(o.status for o in outcomes))


# -- the database goes away ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])  # a clean stop; a crash
def test_the_server_recovers_by_itself_when_the_database_restarts(
    pg_cluster, cluster_empty_db, serve, mode
):
    db = cluster_empty_db
    server = serve(gunicorn("example_app.wsgi:app"), db.uri())
    wait_for_workers(server, db, 2)

    with NoteClients(server.base_url, clients=4) as clients:
        clients.wait(writes=20)
        outage = pg_cluster.restart(down=1.0, mode=mode)
        clients.wait(until=outage.ended + 2.0)
    after = [post_json(server.base_url + "/api/notes", {"body": f"after {n}"}) for n in range(8)]

    during = [o for o in clients.failed() if o.started < outage.ended]
    report(
        mode=mode,
        requests=len(clients.outcomes),
        outage_s=round(outage.seconds, 2),
        failed_during_outage=statuses(during),
        failed_after=len(clients.failed(started_after=outage.ended)),
        commits_in_doubt=server.output.count(IN_DOUBT),
        writes_in_doubt_and_committed=clients.in_doubt(db.notes()),
    )
    assert clients.failed(started_after=outage.ended) == []  # the database is back: all succeed
    assert [reply.status for reply in after] == [201] * 8
    assert set(statuses(during)) <= {500, 503}  # never a cut answer, never a 400
    assert statuses(during).get(500, 0) <= server.output.count(IN_DOUBT)  # 500: in doubt only
    clients.score().check_against([n for n in db.notes() if not n.startswith("after ")])


def test_a_worker_started_while_the_database_is_down_leaves_the_server_up(
    pg_cluster, cluster_empty_db, serve
):
    db = cluster_empty_db
    server = serve(gunicorn("example_app.wsgi:app"), db.uri())
    wait_for_workers(server, db, 2)
    workers = children(server.process.pid)

    pg_cluster.stop()
    try:  # a worker ends (a crash, max_requests, a timeout) while the database is down
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while set(children(server.process.pid)) <= set(workers[1:]) and (
            server.process.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(1.5)  # the new worker imports the app, with the database still down
    finally:
        pg_cluster.start()
    served = [post_json(server.base_url + "/api/notes", {"body": f"after {n}"}) for n in range(4)]

    assert server.process.poll() is None, server.output  # the server is still running
    assert [reply.status for reply in served] == [201] * 4


def test_a_thread_s_first_request_while_the_database_is_down_is_retried(
    pg_cluster, cluster_db, serve
):
    db = cluster_db
    server = serve(gunicorn("tests.fault_app:app", workers=1, threads=1), db.uri())
    # The readiness check used no store: the thread has none, nor a connection.

    pg_cluster.stop()
    try:
        reply = call(server.base_url + "/increment?counter=1", "POST")
    finally:
        pg_cluster.start()

    # Its store cannot connect: a transient failure, retried, then a 503, not a 500.
    assert (reply.status, reply.headers.get("retry-after")) == (503, "1"), server.output


def test_the_server_reconnects_when_its_sessions_are_terminated(
    pg_cluster, cluster_empty_db, serve
):
    db = cluster_empty_db
    server = serve(gunicorn("example_app.wsgi:app"), db.uri())
    wait_for_workers(server, db, 2)

    terminated = []
    with NoteClients(server.base_url, clients=4) as clients:
        for rounds in (1, 2, 3):
            clients.wait(writes=20 * rounds)
            terminated.append(pg_cluster.terminate(db.application_name))
        last = time.monotonic()
        clients.wait(writes=80, until=last + 0.5)

    failed = clients.failed()
    report(
        requests=len(clients.outcomes),
        sessions_terminated=terminated,
        failed=statuses(failed),
        commits_in_doubt=server.output.count(IN_DOUBT),
        writes_in_doubt_and_committed=clients.in_doubt(db.notes()),
    )
    assert sum(terminated) >= 3
    assert clients.failed(started_after=last) == []
    # The only failures: requests whose COMMIT met a terminated session: in doubt, a 500,
    # never run again (even when nothing was written: see the read-only test below).
    assert {o.status for o in failed} <= {500}
    assert len(failed) <= server.output.count(IN_DOUBT)
    clients.score().check_against(db.notes())


def test_sessions_the_database_timed_out_while_idle_are_replaced_unseen(
    pg_cluster, cluster_db, serve
):
    db = cluster_db
    pg_cluster.set_idle_session_timeout(db.name, "300ms")
    server = serve(gunicorn("tests.fault_app:app", workers=1, threads=4), db.uri())

    def each_thread_once() -> list[Reply]:  # four requests held together: one per thread
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: call(server.base_url + "/session?hold=0.5"), range(4)))

    before = each_thread_once()
    deadline = time.monotonic() + 10
    while db.sessions() and time.monotonic() < deadline:  # the server ends them, idle
        time.sleep(0.1)
    timed_out = not db.sessions()
    after = each_thread_once()

    report(
        sessions_before=len({r.session for r in before}),
        sessions_after=len({r.session for r in after}),
        attempts_after=[r.attempt for r in after],
    )
    assert [r.status for r in before] == [200] * 4 and len({r.session for r in before}) == 4
    assert timed_out
    assert [r.status for r in after] == [200] * 4
    assert not {r.session for r in before} & {r.session for r in after}
    assert [r.attempt for r in after] == [2] * 4  # the first found its connection dead


# -- conflicts --------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["repeatable-read", "serializable"])
def test_concurrent_increments_over_http_are_exact(cluster_db, serve, isolation):
    db = cluster_db
    workers, threads, clients, increments = 2, 4, 8, 25
    server = serve(
        gunicorn("tests.fault_app:app", workers=workers, threads=threads),
        db.uri(isolation=isolation),
    )

    def client(number: int) -> list[tuple[int, Reply]]:
        picks = random.Random(number)
        return [
            (counter, call(f"{server.base_url}/increment?counter={counter}", "POST"))
            for counter in (picks.randint(1, 5) for _ in range(increments))
        ]

    with ThreadPoolExecutor(clients) as pool:
        replies = [pair for pairs in pool.map(client, range(clients)) for pair in pairs]

    codes = Tally(reply.status for _, reply in replies)
    sessions = {reply.session for _, reply in replies if reply.ok}
    retried = sum(reply.attempt - 1 for _, reply in replies if reply.ok)
    report(
        isolation=isolation,
        statuses=dict(codes),
        retries=retried,
        retries_logged=server.output.count(RETRY_LINE),
        sessions=len(sessions),
        server_threads=workers * threads,
    )
    assert set(codes) <= {200, 503}  # never a 500
    incremented = Tally(counter for counter, reply in replies if reply.ok)
    assert db.counters() == [incremented[n] for n in range(1, 6)]  # none lost, none twice
    assert codes[200] >= 0.99 * len(replies)
    assert len(sessions) <= workers * threads + 1  # a conflict costs no new connection
    assert retried > 0  # the clients did conflict


# -- request bodies and clients that leave, over real sockets ------------------------------


@pytest.fixture(scope="module")
def one_thread_server(pg_cluster, tmp_path_factory) -> Iterator[tuple[Server, object]]:
    """The fault app under gunicorn with one request thread: requests are served in turn."""
    pg_cluster.ensure_running()
    db = pg_cluster.create_database()
    tmp = tmp_path_factory.mktemp("one-thread")
    command = gunicorn("tests.fault_app:app", workers=1, threads=1)
    server = start_server(command, db.uri(), tmp / "server.log")
    try:
        yield server, db
    finally:
        server.stop()
        pg_cluster.ensure_running()
        db.drop()


def form_body():
    data = b"body=a+note&tag=x%26y&tag=caf%C3%A9"
    expected = {"body": ["a note"], "tag": ["x&y", "café"]}
    return data, {"Content-Type": "application/x-www-form-urlencoded"}, "form", expected


def json_body():
    value = {"body": "a note", "numbers": [1, 2, 3], "nested": {"é": None}}
    return json.dumps(value).encode(), {"Content-Type": "application/json"}, "json", value


def large_body():  # past the 256 KiB middlestorm keeps in memory: spooled to a file
    data = random.Random(7).randbytes(300 * 1024)
    return data, {"Content-Type": "application/octet-stream"}, "raw", data


def chunked_body():  # no Content-Length: http.client sends it chunked, the server decodes it
    data = random.Random(8).randbytes(300 * 1024)
    pieces = iter([data[i : i + 65536] for i in range(0, len(data), 65536)])
    return pieces, {"Content-Type": "application/octet-stream"}, "raw", data


def digest_of(kind: str, expected) -> str:
    data = expected if kind == "raw" else json.dumps(expected, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "make", [form_body, json_body, large_body, chunked_body], ids=lambda make: make.__name__
)
def test_a_post_body_is_read_again_in_full_when_its_request_is_run_again(one_thread_server, make):
    server, db = one_thread_server
    body, headers, kind, expected = make()
    counter_before = db.counters()[0]

    reply = call(server.base_url + "/upload?conflict=1", "POST", body, headers)

    assert reply.status == 201, reply
    assert reply.attempt == 2  # the first attempt met a real serialization failure
    length = len(expected) if kind == "raw" else len(json.dumps(expected, sort_keys=True))
    assert reply.json() == {"kind": kind, "length": length, "sha256": digest_of(kind, expected)}
    note = f"upload {kind} {length} {digest_of(kind, expected)}"
    assert db.notes().count(note) == 1
    assert db.counters()[0] == counter_before + 2  # the other session's, then the retry's


def raw_exchange(server: Server, head: bytes, body: bytes = b"", read: int = 0) -> bytes:
    """Send ``head`` and ``body``, read ``read`` bytes of the response, then reset the
    connection, as a client that crashes or is killed does."""
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head + body)
        received = b""
        while len(received) < read:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
        # SO_LINGER 0: close() sends a reset, as the kernel does for a killed process
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return received


def test_a_client_that_leaves_mid_stream_has_nothing_saved(one_thread_server):
    server, db = one_thread_server
    head = b"GET /stream?tag=left&chunks=100 HTTP/1.1\r\nHost: test\r\n\r\n"

    received = raw_exchange(server, head, read=20_000)
    served_next = call(server.base_url + "/notes/count")  # after the stream's thread is free

    assert received.startswith(b"HTTP/1.1 200")
    assert served_next.status == 200
    assert "stream left" not in db.notes()
    assert db.idle_in_transaction() == 0


def test_a_client_that_reads_the_whole_stream_has_it_saved(one_thread_server):
    server, db = one_thread_server

    reply = call(server.base_url + "/stream?tag=stayed&chunks=5")

    assert reply.status == 200 and len(reply.body) == 5 * 16 * 1024
    assert "stream stayed" in db.notes()


def test_a_client_that_leaves_halfway_through_its_body_has_nothing_saved(one_thread_server):
    server, db = one_thread_server
    head = (
        b"POST /upload?conflict=1 HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    )
    notes_before = db.notes()

    raw_exchange(server, head, b"y" * 30_000)
    served_next = call(server.base_url + "/notes/count")  # after the upload's thread is free

    assert served_next.status == 200
    assert db.notes() == notes_before
    assert db.idle_in_transaction() == 0


def test_a_request_that_never_uses_the_store_opens_no_connection_under_an_access_log(
    cluster_db, serve
):
    db = cluster_db
    # gunicorn's access log looks at every environ value, the store's handle too.
    server = serve(gunicorn("tests.fault_app:app", workers=1, threads=1, access_log=True), db.uri())

    replies = [call(server.base_url + "/api/notes") for _ in range(3)]  # uses no store

    assert [reply.status for reply in replies] == [200] * 3
    assert db.sessions() == []
