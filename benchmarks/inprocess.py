"""``inprocess``: requests/s through the WSGI callable, no HTTP, and each contender's own cost.

For each number of threads, database and route, every contender gets a pool
of that many long-lived threads (warmed up first, so stores and connections
exist), then runs ``--requests`` requests per round, contenders interleaved.
Own cost is the same-round difference in wall-clock µs per request
(1 / requests/s) over bare on ``/nodb`` and over *by hand* elsewhere; on
several threads it is a throughput cost, not a latency.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import report, stats
from benchmarks.contenders import BASELINE, CONTENDERS, ROUTES, baseline_for
from benchmarks.databases import Target
from benchmarks.driver import Workers, base_environ
from benchmarks.options import chosen_contenders, chosen_routes, open_targets

NO_DATABASE = "none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=3000, help="per run (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 4], help="thread counts (default 1 4)"
    )


def _cases(targets: list[Target], routes: list[str]) -> list[tuple[str, Target, str]]:
    """(database label, target, route): ``/nodb`` once, on no database, the rest per database."""
    cases = [(NO_DATABASE, targets[0], "nodb")] if "nodb" in routes else []
    for target in targets:
        cases += [(target.name, target, route) for route in routes if route != "nodb"]
    return cases


def measure(args: argparse.Namespace, targets: list[Target]) -> list[dict[str, Any]]:
    """Every case's per-round requests/s for each contender that serves it."""
    results = []
    names = chosen_contenders(args)
    for threads in args.threads:
        for database, target, route_name in _cases(targets, chosen_routes(args)):
            route = ROUTES[route_name]
            contenders = [name for name in names if CONTENDERS[name].serves(route)]
            apps = {name: CONTENDERS[name].app(target.uri, args.rows) for name in contenders}
            environs = [base_environ(route)]
            pools = {name: Workers(threads) for name in contenders}
            try:
                for name in contenders:  # warm-up: threads, stores, connections, caches
                    pools[name].run(apps[name], environs, max(threads * 20, args.requests // 10))
                samples: dict[str, list[float]] = {name: [] for name in contenders}
                errors = dict.fromkeys(contenders, 0)
                first_errors = dict.fromkeys(contenders, "")
                for order in stats.orders(contenders, args.rounds):
                    for name in order:
                        run = pools[name].run(apps[name], environs, args.requests)
                        samples[name].append(run.per_second)
                        errors[name] += run.errors
                        first_errors[name] = first_errors[name] or run.first_error
            finally:
                for pool in pools.values():
                    pool.close()
            summary = stats.compare(samples, baseline_for(route), BASELINE)
            for name in contenders:
                results.append(
                    {
                        "database": database,
                        "threads": threads,
                        "route": route_name,
                        "contender": name,
                        "per_second": samples[name],
                        "errors": errors[name],
                        "first_error": first_errors[name],
                        "cost_baseline": baseline_for(route),
                        "summary": {k: v.as_dict() for k, v in summary[name].items()},
                    }
                )
    return results


def table(results: list[dict[str, Any]], rounds: int, requests: int) -> report.Table:
    result = report.Table(
        f"In process: requests/s through the WSGI callable ({rounds} rounds of {requests})",
        ["database", "threads", "route", "contender", "req/s", "/ by hand [min, max]",
         "µs over baseline [min, max]", "errors"],
    )  # fmt: skip
    for case in results:
        summary = case["summary"]
        ratio = summary.get("ratio")
        cost = summary.get("cost_us")
        is_baseline = case["contender"] == case["cost_baseline"]
        result.add(
            case["database"],
            case["threads"],
            case["route"],
            CONTENDERS[case["contender"]].label,
            f"{summary['per_second']['median']:,.0f}",
            stats.Spread.from_dict(ratio).text()
            if ratio and case["contender"] != BASELINE
            else "—",
            f"{stats.Spread.from_dict(cost).text(1, sign=True)} vs "
            f"{CONTENDERS[case['cost_baseline']].label}"
            if cost and not is_baseline
            else "—",
            case["errors"],
        )
    result.notes.append(
        "Medians of same-round figures; the baseline is bare on /nodb, by hand elsewhere."
    )
    return result


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    with open_targets(args) as targets:
        results = measure(args, targets)
    return report.publish(
        "inprocess",
        command,
        args,
        ("requests", "rounds", "threads"),
        results,
        [table(results, args.rounds, args.requests)],
    )
