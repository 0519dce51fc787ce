"""``threads``: werkzeug's thread-per-request server on PostgreSQL: requests/s and connections.

Each contender is served by ``werkzeug.serving.make_server(..., threaded=True)``
in a process of its own, started fresh for each round (contenders
interleaved). ``--clients`` client threads send ``--requests`` requests in
all, each on a new connection (``Connection: close``), so each request gets
a new server thread, as with the development server. Connections opened are
counted in the server (a counter on the driver's ``connect``); those open are
sessions in ``pg_stat_activity`` with the contender's ``application_name``,
polled every 20 ms during the run, then one second after it, then again after
the server ran ``gc.collect()``. PostgreSQL only (``--databases`` is ignored).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from typing import Any

from benchmarks import processes, report, stats
from benchmarks.contenders import BASELINE, CONTENDERS, ROUTES
from benchmarks.databases import Target, open_sessions
from benchmarks.options import chosen_contenders, open_targets

#: What each run counts, besides requests/s and errors.
COUNTS = ("connections_opened", "open_peak", "open_mean", "open_after", "open_after_gc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=2000, help="per run (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--route", choices=[r for r in ROUTES if r != "nodb"], default="read",
        help="the route requested (default read)",
    )  # fmt: skip


def request(port: int, path: str, method: str) -> int:
    """One request on a connection of its own; the status code (0 if none came)."""
    message = (
        f"{method} {path} HTTP/1.1\r\nHost: {processes.HOST}:{port}\r\n"
        "Connection: close\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    with socket.create_connection((processes.HOST, port), timeout=60) as connection:
        connection.sendall(message)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    parts = received.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class SessionPoller:
    """Polls how many PostgreSQL sessions carry one ``application_name``, in a thread."""

    def __init__(self, target: Target, tag: str, admin: str, every: float = 0.02) -> None:
        self.target, self.tag, self.admin, self.every = target, tag, admin, every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psycopg2

        connection = psycopg2.connect(self.admin)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                while not self._stop.is_set():
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                        (self.tag,),
                    )
                    self.samples.append(int(cursor.fetchone()[0]))
                    self._stop.wait(self.every)
        finally:
            connection.close()

    def __enter__(self) -> SessionPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


def one_run(args: argparse.Namespace, target: Target, name: str) -> dict[str, Any]:
    """A fresh server for ``name``, ``--requests`` requests from ``--clients`` threads."""
    route = ROUTES[args.route]
    tag = f"bench-threads-{name}"
    port = processes.free_port()
    environment = {
        "BENCH_CONTENDER": name,
        "BENCH_URI": target.tagged(tag),
        "BENCH_ROWS": str(args.rows),
    }
    statuses: list[int] = []
    lock = threading.Lock()
    shares = [args.requests // args.clients + (n < args.requests % args.clients)
              for n in range(args.clients)]  # fmt: skip

    def client(count: int) -> None:
        mine = []
        for _ in range(count):
            try:
                mine.append(request(port, route.path, route.method))
            except OSError:
                mine.append(0)
        with lock:
            statuses.extend(mine)

    command = processes.server_command("werkzeug", port, 0, 0)
    with processes.servers({name: (command, environment, port)}) as running:
        server = running[name]
        clients = [threading.Thread(target=client, args=(share,)) for share in shares]
        with SessionPoller(target, tag, args.postgres_admin) as poller:
            started = time.perf_counter()
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join()
            seconds = time.perf_counter() - started
        opened = json.loads(server.get("/_bench/stats"))["connections"]
        time.sleep(1.0)
        after = open_sessions(target, tag, args.postgres_admin)
        server.get("/_bench/gc")
        time.sleep(0.5)
        after_gc = open_sessions(target, tag, args.postgres_admin)
    return {
        "per_second": len(statuses) / seconds,
        "errors": sum(1 for status in statuses if status != 200),
        "connections_opened": opened,
        "open_peak": max(poller.samples, default=0),
        "open_mean": statistics.fmean(poller.samples) if poller.samples else 0.0,
        "open_after": after,
        "open_after_gc": after_gc,
    }


def measure(args: argparse.Namespace, target: Target) -> list[dict[str, Any]]:
    names = [name for name in chosen_contenders(args) if CONTENDERS[name].uses_db]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for order in stats.orders(names, args.rounds):
        for name in order:
            runs[name].append(one_run(args, target, name))
    summary = stats.compare(
        {name: [run["per_second"] for run in found] for name, found in runs.items()},
        None,
        BASELINE,
    )
    results = []
    for name in names:
        found = runs[name]
        results.append(
            {
                "database": target.name,
                "route": args.route,
                "contender": name,
                "runs": found,
                "summary": {
                    **{key: value.as_dict() for key, value in summary[name].items()},
                    **{
                        key: stats.Spread.of([run[key] for run in found]).as_dict()
                        for key in COUNTS
                    },
                    "errors": sum(run["errors"] for run in found),
                },
            }
        )
    return results


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> report.Table:
    result = report.Table(
        f"werkzeug threaded=True on PostgreSQL: {args.clients} clients, {args.requests} "
        f"requests to /{args.route}, a connection each ({args.rounds} rounds)",
        ["contender", "req/s", "/ by hand [min, max]", "connections opened", "open: peak",
         "mean", "after 1 s", "after gc", "errors"],
    )  # fmt: skip
    for case in results:
        summary = case["summary"]
        ratio = summary.get("ratio")
        result.add(
            CONTENDERS[case["contender"]].label,
            f"{summary['per_second']['median']:,.0f}",
            stats.Spread.from_dict(ratio).text()
            if ratio and case["contender"] != BASELINE
            else "—",
            f"{summary['connections_opened']['median']:,.0f}",
            f"{summary['open_peak']['median']:.0f}",
            f"{summary['open_mean']['median']:.1f}",
            f"{summary['open_after']['median']:.0f}",
            f"{summary['open_after_gc']['median']:.0f}",
            summary["errors"],
        )
    result.notes.append(
        "Medians over rounds. Open sessions are PostgreSQL's (pg_stat_activity); the "
        "benchmark's role may have at most 40."
    )
    return result


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    args.databases = ["postgres"]
    with open_targets(args) as targets:
        results = measure(args, targets[0])
    return report.publish(
        "threads", command, args, ("requests", "clients", "rounds"), results, [table(results, args)]
    )
