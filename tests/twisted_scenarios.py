"""Scenarios run with a real Twisted reactor, one per process (a reactor runs only once).

    python -m tests.twisted_scenarios SCENARIO URI

prints one line of JSON: what the scenario saw. ``tests/test_twisted.py`` runs them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from transaction.interfaces import TransientError
from twisted.internet import defer, task

from middlestorm import RetryPolicy, StoreRegistry
from middlestorm.twisted import DeferredStores
from tests.models import Note


def backend(registry: StoreRegistry) -> int | None:
    if registry.database().__class__.__name__ != "Postgres":
        return None
    return registry.get().execute("SELECT pg_backend_pid()").get_one()[0]


async def many(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    def add(number: int) -> list:
        registry.get().add(Note(f"note {number}"))
        return [number, threading.get_ident(), backend(registry)]

    results = await defer.gatherResults([stores.run(add, n) for n in range(1000)])
    return {
        "numbers": [number for number, _, _ in results],
        "threads": len({thread for _, thread, _ in results}),
        "backends": len({pid for _, _, pid in results if pid is not None}),
    }


async def failure(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    def fail() -> None:
        registry.get().add(Note("rolled back"))
        raise ValueError("bad input")

    try:
        await stores.run(fail)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


async def retry(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    runs: list[int] = []

    def add() -> int:
        runs.append(len(runs) + 1)
        registry.get().add(Note(f"run {runs[-1]}"))
        if len(runs) == 1:
            raise TransientError("a conflict")
        return len(runs)

    return {"runs": await stores.run(add)}


async def live(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    def leak() -> Note:
        note = Note("stays in the thread")
        registry.get().add(note)
        return note

    try:
        await stores.run(leak)
    except TypeError as error:
        return {"error": type(error).__name__}
    return {"error": None}


async def cancel(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    started, proceed = threading.Event(), threading.Event()

    def slow() -> None:
        registry.get().add(Note("cancelled"))
        started.set()
        proceed.wait(10)

    deferred = stores.run(slow)
    while not started.is_set():
        await task.deferLater(reactor, 0.01, lambda: None)
    deferred.cancel()
    try:
        await deferred
    except defer.CancelledError:
        outcome = "cancelled"
    else:
        outcome = "finished"
    proceed.set()
    return {"outcome": outcome}


async def one_by_one(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    threads = set()
    for _ in range(20):
        threads.add(await stores.run(threading.get_ident))
    return {"threads": len(threads)}


async def shutdown(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    seen: dict = {"submitted": 40, "heard": 0}

    def add(number: int) -> None:
        time.sleep(0.01)
        registry.get().add(Note(f"note {number}"))

    def heard(result: object) -> None:
        seen["heard"] += 1

    for number in range(40):  # not awaited: the reactor stops with most still waiting
        stores.run(add, number).addCallback(heard)
    return seen


async def after_shutdown(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    seen: dict = {"error": None}

    def late() -> None:
        registry.get().add(Note("too late"))

    def run_late() -> None:
        stores.run(late).addErrback(lambda failure: seen.update(error=str(failure.value)))

    def in_time() -> None:
        registry.get().add(Note("in time"))

    reactor.addSystemEventTrigger("after", "shutdown", run_late)
    await stores.run(in_time)
    return seen


async def cancel_waiting(reactor: Any, registry: StoreRegistry, stores: DeferredStores) -> dict:
    from twisted.logger import globalLogPublisher

    logged: list[str] = []
    globalLogPublisher.addObserver(
        lambda event: event.get("log_failure") and logged.append(event["log_failure"].type.__name__)
    )
    started, proceed = threading.Event(), threading.Event()
    runs: list[str] = []

    def first() -> None:
        runs.append("first")
        started.set()
        proceed.wait(10)

    def second() -> None:
        runs.append("second")

    one = stores.run(first)
    two = stores.run(second)  # waits: the pool has one thread
    while not started.is_set():
        await task.deferLater(reactor, 0.01, lambda: None)
    one.cancel()
    two.cancel()
    proceed.set()
    for deferred in (one, two):
        deferred.addErrback(lambda failure: failure.trap(defer.CancelledError))
    await task.deferLater(reactor, 0.3, lambda: None)  # both outcomes arrive meanwhile
    return {"runs": runs, "logged": logged}


SCENARIOS = {
    "after_shutdown": after_shutdown,
    "cancel_waiting": cancel_waiting,
    "many": many,
    "failure": failure,
    "retry": retry,
    "live": live,
    "cancel": cancel,
    "one_by_one": one_by_one,
    "shutdown": shutdown,
}


def main() -> None:
    scenario, uri = sys.argv[1], sys.argv[2]
    registry = StoreRegistry({"main": uri})
    seen: dict = {}

    def run(reactor: Any) -> defer.Deferred:
        stores = DeferredStores(
            registry,
            reactor=reactor,
            workers=1 if scenario == "cancel_waiting" else 8,
            policy=RetryPolicy(backoff=0.001),
        )

        async def scenario_then_record() -> None:
            # Read once the reactor has stopped: what a scenario sees during shutdown counts.
            seen["result"] = await SCENARIOS[scenario](reactor, registry, stores)

        return defer.ensureDeferred(scenario_then_record())

    try:
        task.react(run)
    except SystemExit as exit:
        seen["exit"] = exit.code
    print(json.dumps({**seen.pop("result", {}), **seen}))


if __name__ == "__main__":
    main()
