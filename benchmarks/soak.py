"""Minutes of mixed load on a real server while the database is broken, then an audit.

A PostgreSQL 15 cluster of its own (``tests/pgcluster.py``: root and
postgresql-common needed; dropped at the end) serves ``tests.fault_app:app``
under gunicorn's gthread worker. Client threads send a mix of counter
increments (conflicting: five shared counters), note writes and reads, while
faults come in turn: a database restart (fast), all the app's sessions
terminated, a quiet spell long enough for ``idle_session_timeout`` to end
every idle session, and a crash-restart (immediate). Afterwards the database
is checked against what the clients were told: every 2xx write is there,
nothing refused is, nothing else is (a 500, a COMMIT in doubt, may go either
way and is counted apart).

    python benchmarks/soak.py [--minutes 2] [--clients 8] [--workers 2] [--threads 4]
        [--fault-every 15] [--isolation repeatable-read|serializable]

Retries are counted twice: from the ``X-Attempt`` header of each response,
and from the server log's ``transient error in attempt`` lines.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fault_app import Reply, call, post_json
from tests.pgcluster import PrivateCluster, why_no_cluster
from tests.servers import start_server

COUNTERS = 5
IDLE_TIMEOUT = "1s"
QUIET = 2.5  # seconds without requests: longer than IDLE_TIMEOUT


@dataclass
class Result:
    kind: str  # increment, write, read
    key: str  # the counter, or the note's body
    reply: Reply


class Load:
    """Client threads sending a mix of requests until the deadline."""

    def __init__(self, base_url: str, clients: int, deadline: float) -> None:
        self.base_url = base_url
        self.deadline = deadline
        self.results: list[Result] = []
        self.lock = threading.Lock()
        self.running = threading.Event()  # cleared for a quiet spell
        self.running.set()
        self.threads = [
            threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(clients)
        ]

    def client(self, number: int) -> None:
        picks = random.Random(number)
        index = 0
        while time.monotonic() < self.deadline:
            self.running.wait(QUIET * 2)
            roll = picks.random()
            if roll < 0.4:
                counter = str(picks.randint(1, COUNTERS))
                reply = call(f"{self.base_url}/increment?counter={counter}", "POST")
                result = Result("increment", counter, reply)
            elif roll < 0.7:
                body = f"client {number} note {index}"
                index += 1
                result = Result("write", body, post_json(self.base_url + "/notes", {"body": body}))
            else:
                result = Result("read", "", call(self.base_url + "/notes/count"))
            with self.lock:
                self.results.append(result)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(120)


def inject_faults(
    cluster: PrivateCluster, app_name: str, load: Load, every: float, log: list[str]
) -> None:
    """Break something every ``every`` seconds, in turn, until the load's deadline."""
    faults = ["restart (fast, 1 s down)", "terminate sessions", "quiet spell", "crash-restart"]
    started = time.monotonic()
    for number in range(10_000):
        wake = started + every * (number + 1)
        if wake + 5 > load.deadline:
            return
        time.sleep(max(0.0, wake - time.monotonic()))
        fault = faults[number % len(faults)]
        at = time.monotonic() - started
        if fault.startswith("restart"):
            outage = cluster.restart(down=1.0, mode="fast")
            log.append(f"{at:6.1f} s  {fault}: down {outage.seconds:.2f} s")
        elif fault == "crash-restart":
            outage = cluster.restart(down=1.0, mode="immediate")
            log.append(f"{at:6.1f} s  {fault} (immediate): down {outage.seconds:.2f} s")
        elif fault == "terminate sessions":
            log.append(f"{at:6.1f} s  {fault}: {cluster.terminate(app_name)} ended")
        else:
            load.running.clear()
            time.sleep(QUIET)
            idle_left = len(cluster.sessions(app_name))
            load.running.set()
            log.append(f"{at:6.1f} s  {fault} of {QUIET} s: {idle_left} app sessions left open")


def failure_causes(output: str) -> Counter:
    """The final exception of each traceback the server logged, by type."""
    causes: Counter = Counter()
    records = re.split(r"\n(?=\[\d{4}-|INFO |WARNING |ERROR |CRITICAL )", output)
    for record in records:
        if "Traceback (most recent call last):" in record:
            finals = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)): ", record, re.MULTILINE)
            if finals:
                causes[finals[-1]] += 1
    return causes


def audit(load: Load, db, output: str) -> list[str]:
    """Check the database against what the clients were told; the report's lines."""
    lines = []
    results = load.results
    by_kind = Counter(r.kind for r in results)
    statuses = Counter((r.kind, r.reply.status) for r in results)
    lines.append(f"requests: {len(results)} ({', '.join(f'{k} {n}' for k, n in by_kind.items())})")
    for (kind, status), count in sorted(statuses.items(), key=lambda item: str(item[0])):
        lines.append(f"  {kind:9} {status if status is not None else 'no answer'}: {count}")
    attempts = Counter(r.reply.attempt for r in results if r.reply.ok)
    retried = sum((attempt - 1) * n for attempt, n in attempts.items())
    lines.append(
        f"retries: {retried} by X-Attempt (attempts of the 2xx: "
        f"{dict(sorted(attempts.items()))}); "
        f"{output.count('transient error in attempt')} 'transient error in attempt' log lines"
    )
    lines.append(f"sessions that served a 2xx: {len({r.reply.session for r in results} - {None})}")
    errors = Counter(r.reply.error.split(":")[0] for r in results if r.reply.error)
    lines.append(f"no answer, by error: {dict(errors) or 0}")
    lines.append(f"server tracebacks, by final exception: {dict(failure_causes(output)) or 0}")
    lines.append(f"COMMITs in doubt (logged): {output.count('COMMIT is in doubt')}")

    # Notes: 2xx written, 400/503 not, 500 or no answer unknown.
    saved = {r.key for r in results if r.kind == "write" and r.reply.ok}
    refused = {r.key for r in results if r.kind == "write" and r.reply.status in (400, 503)}
    unknown = {r.key for r in results if r.kind == "write"} - saved - refused
    notes = db.notes()
    in_db = set(notes)
    lost, phantom = saved - in_db, in_db - saved - unknown
    lines.append(
        f"notes: {len(saved)} acknowledged, {len(in_db)} in the database, "
        f"{len(unknown)} unknown ({len(unknown & in_db)} of them committed); "
        f"lost {len(lost)}, phantom {len(phantom)}, refused yet saved {len(refused & in_db)}, "
        f"duplicated {len(notes) - len(in_db)}"
    )
    # Counters: each 2xx increment exactly once; a 500 or no answer may or may not count.
    counted = Counter(r.key for r in results if r.kind == "increment" and r.reply.ok)
    maybe = Counter(
        r.key
        for r in results
        if r.kind == "increment" and not r.reply.ok and r.reply.status not in (400, 503)
    )
    values = db.counters()
    counter_lost = counter_phantom = 0
    for number, value in enumerate(values, 1):
        key = str(number)
        counter_lost += max(0, counted[key] - value)
        counter_phantom += max(0, value - counted[key] - maybe[key])
    lines.append(
        f"counters: {sum(counted.values())} acknowledged increments, {sum(values)} in the "
        f"database, {sum(maybe.values())} unknown; lost {counter_lost}, phantom {counter_phantom}"
    )
    ok = not (lost or phantom or refused & in_db or counter_lost or counter_phantom)
    ok = ok and len(notes) == len(in_db)
    lines.append("audit: " + ("PASS (0 lost, 0 phantom)" if ok else "FAIL"))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults")
    parser.add_argument(
        "--isolation", default="repeatable-read", choices=["repeatable-read", "serializable"]
    )
    args = parser.parse_args()
    problem = why_no_cluster()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2

    cluster = PrivateCluster.create(prefix="middlestorm_soak_")
    server = None
    try:
        db = cluster.create_database()
        cluster.set_idle_session_timeout(db.name, IDLE_TIMEOUT)
        command = [
            "{python}", "-m", "gunicorn", "-k", "gthread", "--threads", str(args.threads),
            "-w", str(args.workers), "-b", "127.0.0.1:{port}", "tests.fault_app:app",
        ]  # fmt: skip
        log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
        server = start_server(command, db.uri(isolation=args.isolation), log_path)
        print(
            f"soak: {args.minutes} min, {args.clients} clients, gunicorn gthread "
            f"-w {args.workers} --threads {args.threads}, {args.isolation}, "
            f"PostgreSQL cluster {cluster.name} on port {cluster.port}, "
            f"idle_session_timeout {IDLE_TIMEOUT}, a fault every {args.fault_every:g} s"
        )
        started = time.monotonic()
        load = Load(server.base_url, args.clients, started + args.minutes * 60)
        faults: list[str] = []
        load.start()
        injector = threading.Thread(
            target=inject_faults,
            args=(cluster, db.application_name, load, args.fault_every, faults),
            daemon=True,
        )
        injector.start()
        load.join()
        injector.join(60)
        elapsed = time.monotonic() - started
        cluster.ensure_running()
        server.stop()
        output = server.output
        print("faults:")
        for line in faults:
            print("  " + line)
        print(f"served {len(load.results)} requests in {elapsed:.0f} s")
        report = audit(load, db, output)
        for line in report:
            print(line)
        print(f"server log: {log_path}")
        return 0 if report[-1].endswith("(0 lost, 0 phantom)") else 1
    finally:
        if server is not None:
            server.stop()
        cluster.drop()


if __name__ == "__main__":
    sys.exit(main())
