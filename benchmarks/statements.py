"""``statements``: what each contender sends the database per request, route by route.

A fresh app per contender and route serves ``--requests`` requests on
``--threads`` long-lived threads, in this process, with a Storm tracer
counting statements and transaction ends (:mod:`benchmarks.counting`) and a
counter on the drivers' ``connect``. The figures are exact counts, not
timings, so one round is enough.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import counting, report
from benchmarks.contenders import CONTENDERS, ROUTES
from benchmarks.driver import Workers, base_environ
from benchmarks.options import chosen_contenders, chosen_routes, open_targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=200, help="per case (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="threads (default 1)")


def measure(args: argparse.Namespace, targets: list[Any]) -> list[dict[str, Any]]:
    results = []
    tracer = counting.install()
    try:
        for target in targets:
            for route_name in chosen_routes(args):
                route = ROUTES[route_name]
                for name in chosen_contenders(args):
                    if not CONTENDERS[name].serves(route):
                        continue
                    app = CONTENDERS[name].app(target.uri, args.rows)
                    before = tracer.snapshot()
                    with Workers(args.threads) as workers:
                        run = workers.run(app, [base_environ(route)], args.requests)
                        counts = tracer.snapshot() - before  # not the threads' ends
                    results.append(
                        {
                            "database": target.name,
                            "route": route_name,
                            "contender": name,
                            "requests": args.requests,
                            "threads": args.threads,
                            "errors": run.errors,
                            "first_error": run.first_error,
                            "counts": counts.as_dict(),
                        }
                    )
    finally:
        counting.uninstall()
    return results


def table(results: list[dict[str, Any]], requests: int, threads: int) -> report.Table:
    result = report.Table(
        f"Statements per request ({requests} requests on {threads} thread(s), fresh app each)",
        ["database", "route", "contender", "statements", "commits", "rollbacks", "empty ends",
         "connections (all)", "errors"],
    )  # fmt: skip
    for case in results:
        counts, n = case["counts"], case["requests"]
        result.add(
            case["database"],
            case["route"],
            CONTENDERS[case["contender"]].label,
            *(f"{counts[key] / n:.2f}" for key in ("statements", "commits", "rollbacks")),
            f"{counts['empty_ends'] / n:.2f}",
            counts["connections"],
            case["errors"],
        )
    result.notes.append(
        "Per request, except the connections opened in all. An empty end is a commit or rollback "
        "call on a connection that had sent nothing since the last one; PostgreSQL's driver "
        "sends nothing for it."
    )
    return result


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    with open_targets(args) as targets:
        results = measure(args, targets)
    return report.publish(
        "statements",
        command,
        args,
        ("requests", "threads"),
        results,
        [table(results, args.requests, args.threads)],
    )
