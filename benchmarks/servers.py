"""``servers``: real servers on 127.0.0.1 under ``wrk``: requests/s, p50 and p99 latency.

For each server (waitress; gunicorn's ``gthread`` worker) and database, one
server process per contender runs at once, each on its own port; ``wrk``
(Debian package ``wrk``) loads one at a time for ``--seconds`` per route,
contenders interleaved round by round, after a one-second warm-up each.
``/nodb`` is measured once, on the first database. Each contender has rows of
its own, and on SQLite a copy of the file of its own: when wrk stops, it
drops requests in flight, and a contender that then leaves its transaction
open (repoze.tm2 does, until that thread's next request) must not stall the
others' writes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import processes, report, stats
from benchmarks.contenders import BASELINE, CONTENDERS, ROUTES
from benchmarks.databases import Target
from benchmarks.options import chosen_contenders, chosen_routes, open_targets

SERVERS = {"waitress": "waitress", "gunicorn": "gunicorn gthread"}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=3, help="per wrk run (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--connections",
        type=int,
        default=4,
        help="wrk's open connections (default 4, one per server thread)",
    )
    parser.add_argument("--server-threads", type=int, default=4, help="per process (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers (default 1)")
    parser.add_argument(
        "--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS), help="default: both"
    )


def wrk(url: str, seconds: int, connections: int, script: Path | None) -> dict[str, float]:
    """One ``wrk --latency`` run: requests/s, p50 and p99 in ms, non-2xx and socket errors."""
    wrk_path = shutil.which("wrk")
    if wrk_path is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    command = [
        wrk_path,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "60s",
        "--latency",
    ]
    command += ["-s", str(script)] if script else []
    output = subprocess.run(
        [*command, url], capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    return parse_wrk(output)


def parse_wrk(output: str) -> dict[str, float]:
    def latency(percent: str) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        return float(found.group(1)) * _UNITS[found.group(2)] if found else float("nan")

    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: (.*)", output)
    socket_errors = sum(int(n) for n in re.findall(r"\d+", sockets.group(1))) if sockets else 0
    return {
        "per_second": float(rate.group(1)) if rate else 0.0,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0) + socket_errors,
    }


def _block(
    args: argparse.Namespace, kind: str, target: Target, routes: list[str], script: Path
) -> list[dict[str, Any]]:
    """One server kind on one database: every contender's server up at once, then the rounds."""
    database = target.name if routes != ["nodb"] else "none"
    names = [
        name
        for name in chosen_contenders(args)
        if any(CONTENDERS[name].serves(ROUTES[route]) for route in routes)
    ]
    specs = {}
    for name in names:
        port = processes.free_port()
        command = processes.server_command(kind, port, args.server_threads, args.workers)
        environment = {
            "BENCH_CONTENDER": name,
            "BENCH_URI": target.private_copy(name).tagged(f"bench-{name}"),
            "BENCH_ROWS": str(args.rows),
        }
        specs[name] = (command, environment, port)
    results = []
    with processes.servers(specs) as running:
        for name, server in running.items():  # warm-up: threads, stores, connections
            warm = next(r for r in routes if CONTENDERS[name].serves(ROUTES[r]))
            wrk(server.url + ROUTES[warm].path, 1, args.connections, None)
        for route_name in routes:
            route = ROUTES[route_name]
            contenders = [name for name in names if CONTENDERS[name].serves(route)]
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
            for order in stats.orders(contenders, args.rounds):
                for name in order:
                    samples[name].append(
                        wrk(
                            running[name].url + route.path,
                            args.seconds,
                            args.connections,
                            script if route.method == "POST" else None,
                        )
                    )
            rates = {name: [s["per_second"] for s in runs] for name, runs in samples.items()}
            summary = stats.compare(rates, None, BASELINE)
            for name in contenders:
                runs = samples[name]
                results.append(
                    {
                        "server": kind,
                        "database": database,
                        "route": route_name,
                        "contender": name,
                        "runs": runs,
                        "summary": {
                            **{k: v.as_dict() for k, v in summary[name].items()},
                            "p50_ms": stats.Spread.of([r["p50_ms"] for r in runs]).as_dict(),
                            "p99_ms": stats.Spread.of([r["p99_ms"] for r in runs]).as_dict(),
                            "errors": sum(int(r["errors"]) for r in runs),
                        },
                    }
                )
    return results


def measure(args: argparse.Namespace, targets: list[Target]) -> list[dict[str, Any]]:
    routes = chosen_routes(args)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Length"] = "0"\n')
        results = []
        for kind in args.servers:
            if "nodb" in routes:
                results += _block(args, kind, targets[0], ["nodb"], script)
            for target in targets:
                db_routes = [route for route in routes if route != "nodb"]
                if db_routes:
                    results += _block(args, kind, target, db_routes, script)
    return results


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> report.Table:
    result = report.Table(
        f"Servers under wrk ({args.rounds} rounds of {args.seconds} s, {args.connections} "
        f"connections; {args.server_threads} threads, gunicorn -w {args.workers})",
        ["server", "database", "route", "contender", "req/s", "/ by hand [min, max]",
         "p50 ms", "p99 ms", "errors"],
    )  # fmt: skip
    for case in results:
        summary = case["summary"]
        ratio = summary.get("ratio")
        result.add(
            SERVERS[case["server"]],
            case["database"],
            case["route"],
            CONTENDERS[case["contender"]].label,
            f"{summary['per_second']['median']:,.0f}",
            stats.Spread.from_dict(ratio).text()
            if ratio and case["contender"] != BASELINE
            else "—",
            f"{summary['p50_ms']['median']:.2f}",
            f"{summary['p99_ms']['median']:.2f}",
            summary["errors"],
        )
    result.notes.append("Medians over rounds; latency percentiles are wrk's, per run.")
    return result


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    with open_targets(args) as targets:
        results = measure(args, targets)
    return report.publish(
        "servers",
        command,
        args,
        ("seconds", "rounds", "connections", "server_threads", "workers"),
        results,
        [table(results, args)],
    )
