"""``workers``: per-call cost of a unit of work run for Twisted or asyncio, against by hand.

Each call reads one row by primary key in a worker thread and commits. *By
hand* is what users write today: Twisted's ``deferToThreadPool`` (or
asyncio's ``run_in_executor``) over a pool of 8 threads, each with a
``threading.local`` Storm store and an explicit commit (rollback on error).
*ZStorm + transaction* runs in the same pool with Storm's own ``ZStorm``,
committing through ``transaction.manager``: the machinery middlestorm builds
on, so the gap between it and by hand is what any such commit costs.
*middlestorm* is ``DeferredStores(registry, workers=8).run`` (or
``AsyncStores``). Every round issues ``--calls`` concurrent calls and times
them all; contenders alternate, rounds rotate who goes first. One reactor
runs every Twisted round (a reactor runs only once per process).

    python -m benchmarks workers [--calls 1000] [--rounds 5] [--postgres URI]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storm.database import create_database
from storm.locals import Int, Unicode
from storm.store import Store

from benchmarks import report
from benchmarks.databases import (
    DEFAULT_ADMIN,
    DEFAULT_POSTGRES,
    _pg_connect,
    ensure_postgres,
    postgres_dsn,
)
from middlestorm import StoreRegistry

WORKERS = 8
CONTENDERS = ("by hand", "ZStorm + transaction", "middlestorm")
ROWS = 1000
#: A table of its own, so that it can run beside the other measurements.
TABLE = "worker_row"


def seed(uri: str) -> None:
    connection = _pg_connect(postgres_dsn(uri))
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        cursor.execute(
            f"INSERT INTO {TABLE} SELECT n, 'row ' || n FROM generate_series(1, %s) AS n",
            (ROWS,),
        )
    connection.close()


class Row:
    __storm_table__ = TABLE
    id = Int(primary=True)
    body = Unicode()


def by_hand_reader(uri: str) -> Callable[[int], str]:
    """A function reading a row with a hand-made per-thread store that commits itself."""
    database = create_database(uri)
    local = threading.local()

    def read(number: int) -> str:
        store = getattr(local, "store", None)
        if store is None:
            store = local.store = Store(database)
        try:
            body = store.get(Row, number % ROWS + 1).body
            store.commit()
        except BaseException:
            store.rollback()
            raise
        return body

    return read


def zstorm_reader(uri: str) -> Callable[[int], str]:
    """The same read with Storm's own ``ZStorm``: a per-thread store that joins
    ``transaction.manager``, committed through it (what middlestorm builds on)."""
    import transaction
    from storm.zope.zstorm import ZStorm

    zstorm = ZStorm()
    zstorm.set_default_uri("main", uri)

    def read(number: int) -> str:
        try:
            body = zstorm.get("main").get(Row, number % ROWS + 1).body
            transaction.commit()
        except BaseException:
            transaction.abort()
            raise
        return body

    return read


def middlestorm_reader(registry: StoreRegistry) -> Callable[[int], str]:
    def read(number: int) -> str:
        return registry.get().get(Row, number % ROWS + 1).body

    return read


def twisted_rounds(
    uri: str, calls: int, rounds: int, done: Callable[[dict[str, list[float]]], None]
) -> None:
    """µs per call for each contender, round by round, under one reactor, given to ``done``
    (``task.react`` ends the process when the reactor stops)."""
    from twisted.internet import defer, task, threads
    from twisted.python.threadpool import ThreadPool

    from middlestorm.twisted import DeferredStores

    seen: dict[str, list[float]] = {name: [] for name in CONTENDERS}

    async def main(reactor: Any) -> None:
        pool = ThreadPool(minthreads=0, maxthreads=WORKERS, name="by-hand")
        pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
        hand = by_hand_reader(uri)
        zstorm = zstorm_reader(uri)
        registry = StoreRegistry({"main": uri})
        stores = DeferredStores(registry, reactor=reactor, workers=WORKERS)
        run = {
            "by hand": lambda n: threads.deferToThreadPool(reactor, pool, hand, n),
            "ZStorm + transaction": lambda n: threads.deferToThreadPool(reactor, pool, zstorm, n),
            "middlestorm": lambda n: stores.run(middlestorm_reader(registry), n),
        }
        order = list(run)
        for number in range(rounds + 1):  # round 0 warms up
            for name in order:
                started = time.perf_counter()
                await defer.gatherResults([run[name](n) for n in range(calls)])
                if number:
                    seen[name].append((time.perf_counter() - started) / calls * 1e6)
            order = order[1:] + order[:1]
        done(seen)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def asyncio_rounds(uri: str, calls: int, rounds: int) -> dict[str, list[float]]:
    from middlestorm.aio import AsyncStores

    seen: dict[str, list[float]] = {name: [] for name in CONTENDERS}

    async def main() -> None:
        executor = ThreadPoolExecutor(WORKERS)
        hand = by_hand_reader(uri)
        zstorm = zstorm_reader(uri)
        registry = StoreRegistry({"main": uri})
        loop = asyncio.get_running_loop()
        async with AsyncStores(registry, workers=WORKERS) as stores:
            run = {
                "by hand": lambda n: loop.run_in_executor(executor, hand, n),
                "ZStorm + transaction": lambda n: loop.run_in_executor(executor, zstorm, n),
                "middlestorm": lambda n: stores.run(middlestorm_reader(registry), n),
            }
            order = list(run)
            for number in range(rounds + 1):
                for name in order:
                    started = time.perf_counter()
                    await asyncio.gather(*(run[name](n) for n in range(calls)))
                    if number:
                        seen[name].append((time.perf_counter() - started) / calls * 1e6)
                order = order[1:] + order[:1]
        executor.shutdown()

    asyncio.run(main())
    return seen


def table(runtime: str, seen: dict[str, list[float]], calls: int) -> report.Table:
    rows = report.Table(
        f"{runtime}: {calls} concurrent calls over {WORKERS} threads, "
        "read one row by primary key on PostgreSQL",
        ["contender", "µs per call", "/ by hand [min, max]"],
    )
    hand = seen["by hand"]
    for name, values in seen.items():
        ratios = [value / base for value, base in zip(values, hand, strict=True)]
        cell = (
            "—"
            if name == "by hand"
            else (f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")
        )
        rows.add(name, f"{statistics.median(values):.1f}", cell)
    rows.notes.append("Medians over rounds; a ratio above 1 is slower than by hand.")
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks workers", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--postgres-admin", default=DEFAULT_ADMIN)
    parser.add_argument("--runtime", choices=["asyncio", "twisted"], default="asyncio")
    args = parser.parse_args(argv)
    ensure_postgres(args.postgres, args.postgres_admin)
    seed(args.postgres)
    command = report.command_line(["workers", *argv])

    def show(seen: dict[str, list[float]]) -> None:
        report.show(command, [table(args.runtime, seen, args.calls)])

    if args.runtime == "asyncio":
        show(asyncio_rounds(args.postgres, args.calls, args.rounds))
    else:
        twisted_rounds(args.postgres, args.calls, args.rounds, show)
