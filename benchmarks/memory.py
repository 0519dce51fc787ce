"""``memory``: resident memory per thread with a store, and over many requests.

Each contender runs in a fresh process of its own per database (RSS from
``/proc/self/statm``):

* per thread: after one request of each kind in the main thread (so that
  one-time costs are paid), ``--store-threads`` threads each answer one ``/nodb`` request
  and wait (RSS *a*), then each answers one ``/read`` request, so that each
  has a store and a connection, and waits again (RSS *b*); a thread costs
  (a - before) / threads, its store (b - a) / threads;
* over requests: ``--requests`` requests on ``--threads`` threads, cycling
  through the routes the contender serves (bare: ``/nodb`` only), RSS
  sampled after each tenth; growth is the RSS at the end minus at half way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from typing import Any

from benchmarks import report
from benchmarks.contenders import CONTENDERS, ROUTES
from benchmarks.databases import Target
from benchmarks.driver import Workers, base_environ, call
from benchmarks.options import chosen_contenders, chosen_routes, open_targets
from benchmarks.processes import CHECKOUT

PAGE = os.sysconf("SC_PAGE_SIZE")
SAMPLES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests", type=int, default=100_000, help="requests per contender (default 100000)"
    )
    parser.add_argument("--threads", type=int, default=4, help="for the requests (default 4)")
    parser.add_argument(
        "--store-threads", type=int, default=32, help="threads holding a store (default 32)"
    )


def rss() -> int:
    """This process's resident set, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def per_thread(app: Any, threads: int, with_store: bool) -> dict[str, float | None]:
    """RSS before, with ``threads`` idle threads, and with each holding a store."""
    barrier = threading.Barrier(threads + 1)
    nodb, read = base_environ(ROUTES["nodb"]), base_environ(ROUTES["read"])

    def work() -> None:
        call(app, dict(nodb))
        barrier.wait()  # a: threads, no store
        barrier.wait()
        if with_store:
            call(app, dict(read))
        barrier.wait()  # b: threads with a store
        barrier.wait()

    before = rss()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    threads_only = rss()
    barrier.wait()
    barrier.wait()
    with_stores = rss()
    barrier.wait()
    for worker in workers:
        worker.join()
    return {
        "kib_per_thread": (threads_only - before) / threads / 1024,
        "kib_per_store": (with_stores - threads_only) / threads / 1024 if with_store else None,
    }


def case(spec: dict[str, Any]) -> dict[str, Any]:
    """One contender on one database, in this (fresh) process."""
    contender = CONTENDERS[spec["contender"]]
    app = contender.app(spec["uri"], spec["rows"])
    for route in ("nodb", "read") if contender.uses_db else ("nodb",):
        call(app, base_environ(ROUTES[route]))  # one-time costs: imports, caches, a store
    result = per_thread(app, spec["store_threads"], contender.uses_db)
    routes = [ROUTES[name] for name in spec["routes"] if contender.serves(ROUTES[name])]
    environs = [base_environ(route) for route in routes]
    chunk = max(1, spec["requests"] // SAMPLES)
    samples, errors = [rss()], 0
    with Workers(spec["threads"]) as workers:
        for _ in range(SAMPLES):
            errors += workers.run(app, environs, chunk).errors
            samples.append(rss())
    return {
        **result,
        "routes": [route.name for route in routes],
        "rss_mib": [sample / 2**20 for sample in samples],
        "growth_second_half_kib": (samples[-1] - samples[SAMPLES // 2]) / 1024,
        "errors": errors,
    }


def measure(args: argparse.Namespace, targets: list[Target]) -> list[dict[str, Any]]:
    results = []
    for target in targets:
        for name in chosen_contenders(args):
            spec = {
                "contender": name,
                "uri": target.uri,
                "rows": args.rows,
                "routes": chosen_routes(args),
                "requests": args.requests,
                "threads": args.threads,
                "store_threads": args.store_threads,
            }
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                capture_output=True, text=True, check=True, cwd=CHECKOUT,
            ).stdout  # fmt: skip
            results.append({"database": target.name, "contender": name, **json.loads(output)})
    return results


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> report.Table:
    result = report.Table(
        f"Memory: {args.store_threads} threads with a store; {args.requests:,} requests on "
        f"{args.threads} threads",
        ["database", "contender", "KiB/thread", "KiB/store", "RSS start MiB", "half", "end",
         "growth 2nd half KiB", "errors"],
    )  # fmt: skip
    for case in results:
        samples = case["rss_mib"]
        store = case["kib_per_store"]
        result.add(
            case["database"],
            CONTENDERS[case["contender"]].label,
            f"{case['kib_per_thread']:.0f}",
            f"{store:.0f}" if store is not None else "—",
            f"{samples[0]:.1f}",
            f"{samples[SAMPLES // 2]:.1f}",
            f"{samples[-1]:.1f}",
            f"{case['growth_second_half_kib']:+,.0f}",
            case["errors"],
        )
    result.notes.append("Bare serves /nodb only, in both parts.")
    return result


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    with open_targets(args) as targets:
        results = measure(args, targets)
    return report.publish(
        "memory",
        command,
        args,
        ("requests", "threads", "store_threads"),
        results,
        [table(results, args)],
    )


if __name__ == "__main__":
    print(json.dumps(case(json.loads(sys.argv[1]))))
