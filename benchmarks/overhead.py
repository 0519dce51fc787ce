"""What middlestorm costs per request, against the hand-written equivalent.

Both apps add one row and answer with a list body; the hand-written one keeps
a store per thread in a ``threading.local`` and commits itself. A third pair
is an app that touches no store, bare and wrapped: the fixed cost per request. Requests are
WSGI calls in this process (no HTTP), so the difference is the middleware's
own work: its transaction, environ proxy, body handling and data manager.

    python benchmarks/overhead.py [--requests 3000] [--threads 1 4] [--postgres URI]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storm.database import create_database
from storm.locals import Int, Unicode
from storm.store import Store

from middlestorm import MiddleStorm


class Row:
    __storm_table__ = "bench"
    id = Int(primary=True)
    body = Unicode()

    def __init__(self, body: str) -> None:
        self.body = body


def start_response(status, headers, exc_info=None):
    return lambda data: None


ENVIRON = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "wsgi.input": None}


def hand_written(uri: str):
    database = create_database(uri)
    local = threading.local()

    def app(environ, start_response):
        store = getattr(local, "store", None)
        if store is None:
            store = local.store = Store(database)
        try:
            store.add(Row("hand-written"))
            store.commit()
        except BaseException:
            store.rollback()
            raise
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def with_middlestorm(uri: str):
    def app(environ, start_response):
        environ["storm.store"].add(Row("middlestorm"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return MiddleStorm(app, uri)


def untouched(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def run(app, requests: int, threads: int) -> float:
    """Seconds per request, wall clock, ``threads`` calling at once."""

    def worker(count: int) -> None:
        for _ in range(count):
            body = app(dict(ENVIRON), start_response)
            getattr(body, "close", lambda: None)()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(worker, requests // threads) for _ in range(threads)]:
            done.result()
    return (time.perf_counter() - started) / (requests // threads * threads)


def prepare(uri: str) -> None:
    store = Store(create_database(uri))
    serial = "SERIAL" if uri.startswith("postgres") else "INTEGER"
    store.execute("DROP TABLE IF EXISTS bench")
    store.execute(f"CREATE TABLE bench (id {serial} PRIMARY KEY, body TEXT)")
    store.commit()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--postgres", metavar="URI", help="also measure on this database")
    options = parser.parse_args()
    folder = tempfile.mkdtemp()
    # A lock timeout long enough for four writers on a loaded machine, for both contenders.
    uris = {"SQLite": f"sqlite:{Path(folder) / 'bench.db'}?timeout=30"}
    if options.postgres:
        uris["PostgreSQL"] = options.postgres
    print(
        f"{'database':<11} {'threads':>7} {'hand-written':>13} {'middlestorm':>12} {'overhead':>9}"
    )
    cases = [
        ("no store", uris["SQLite"], lambda uri: untouched, lambda uri: MiddleStorm(untouched, uri))
    ]
    cases += [(name, uri, hand_written, with_middlestorm) for name, uri in uris.items()]
    for name, uri, bare, wrapped in cases:
        prepare(uri)
        apps = {"hand": bare(uri), "middlestorm": wrapped(uri)}
        for threads in options.threads:
            times = {key: [] for key in apps}
            for _ in range(options.rounds):  # interleaved, so drift hits both alike
                for key, app in apps.items():
                    times[key].append(run(app, options.requests, threads))
            hand, ours = (statistics.median(times[key]) * 1e6 for key in apps)
            print(
                f"{name:<11} {threads:>7} {hand:>10.1f} µs {ours:>9.1f} µs {ours - hand:>+6.1f} µs"
            )


if __name__ == "__main__":
    main()
