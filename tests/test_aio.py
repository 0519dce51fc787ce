"""asyncio: coroutines await units of work run in worker threads with their own stores."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest
from transaction.interfaces import TransientError

from middlestorm import ConfigurationError, RetryPolicy
from middlestorm.aio import AsyncStores
from middlestorm.work import LiveObjectError
from tests.models import Note
from tests.test_stores import wait_for


def test_a_thousand_concurrent_awaits_use_at_most_one_store_per_worker(registry, db):
    def add(number: int) -> tuple[int, int]:
        store = registry.get()
        store.add(Note(f"note {number}"))
        return number, threading.get_ident()

    async def main() -> list[tuple[int, int]]:
        async with AsyncStores(registry, workers=8) as stores:
            return await asyncio.gather(*(stores.run(add, n) for n in range(1000)))

    results = asyncio.run(main())

    assert [number for number, _ in results] == list(range(1000))
    assert len({thread for _, thread in results}) <= 8
    assert len(db.notes()) == 1000
    if db.kind == "postgres":
        assert wait_for(lambda: db.backends() == 0)  # the workers' connections are closed


def test_a_failure_reaches_the_awaiting_coroutine_and_nothing_is_committed(registry, db):
    def fail() -> None:
        registry.get().add(Note("rolled back"))
        raise ValueError("bad input")

    async def main() -> None:
        async with AsyncStores(registry) as stores:
            await stores.run(fail)

    with pytest.raises(ValueError, match="bad input"):
        asyncio.run(main())
    assert db.notes() == []


def test_a_transient_failure_is_run_again(registry, db):
    runs: list[int] = []

    def add() -> int:
        runs.append(len(runs) + 1)
        registry.get().add(Note(f"run {runs[-1]}"))
        if len(runs) == 1:
            raise TransientError("a conflict")
        return len(runs)

    async def main() -> int:
        async with AsyncStores(registry, policy=RetryPolicy(backoff=0.001)) as stores:
            return await stores.run(add)

    assert asyncio.run(main()) == 2
    assert db.notes() == ["run 2"]


class Held:
    """A unit of work that adds a note, says it has started, and waits to be let go."""

    def __init__(self, registry, body: str) -> None:
        self.registry, self.body = registry, body
        self.started, self.proceed = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self.registry.get().add(Note(self.body))
        self.started.set()
        self.proceed.wait(10)

    async def under_way(self) -> None:
        """Return once the unit of work has started (without blocking the event loop)."""
        await asyncio.get_running_loop().run_in_executor(None, self.started.wait, 10)


def test_cancelling_the_awaiting_task_rolls_the_unit_of_work_back(registry, db):
    slow = Held(registry, "cancelled")

    async def main() -> None:
        async with AsyncStores(registry) as stores:
            task = asyncio.create_task(stores.run(slow))
            await slow.under_way()
            task.cancel()  # the caller gives up while the unit of work runs
            with pytest.raises(asyncio.CancelledError):
                await task
            slow.proceed.set()

    asyncio.run(main())

    assert db.notes() == []


def test_a_unit_of_work_raising_stopiteration_reaches_the_awaiter_as_runtimeerror(registry, db):
    def stop() -> None:
        registry.get().add(Note("rolled back"))
        raise StopIteration("a generator ran out in the wrong place")

    async def main() -> None:
        async with AsyncStores(registry) as stores:
            await asyncio.wait_for(stores.run(stop), 10)

    with pytest.raises(RuntimeError, match="StopIteration"):
        asyncio.run(main())
    assert db.notes() == []


def test_calls_waiting_when_the_stores_close_are_run_first(registry, db):
    def add(number: int) -> None:
        time.sleep(0.005)
        registry.get().add(Note(f"note {number}"))

    async def main() -> None:
        stores = AsyncStores(registry, workers=2)
        pending = [asyncio.ensure_future(stores.run(add, n)) for n in range(20)]
        await asyncio.sleep(0)  # every call is handed to the pool
        await stores.aclose()
        await asyncio.gather(*pending)

    asyncio.run(main())

    assert sorted(db.notes()) == sorted(f"note {number}" for number in range(20))


def test_a_unit_of_work_finishing_right_after_its_task_was_cancelled_is_rolled_back(registry, db):
    slow = Held(registry, "cancelled")

    async def main() -> None:
        async with AsyncStores(registry) as stores:
            task = asyncio.create_task(stores.run(slow))
            await slow.under_way()
            task.cancel()
            slow.proceed.set()
            time.sleep(0.3)  # the unit of work ends before the task hears it was cancelled
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())

    assert db.notes() == []


def test_stores_serve_two_event_loops_in_two_threads_at_once(registry, db):
    stores = AsyncStores(registry, workers=4)
    results: dict[str, list[int]] = {}

    def add(number: int) -> int:
        registry.get().add(Note(f"note {number}"))
        return number

    def loop_thread(name: str, first: int) -> None:
        async def main() -> list[int]:
            return await asyncio.wait_for(
                asyncio.gather(*(stores.run(add, n) for n in range(first, first + 200))), 20
            )

        results[name] = asyncio.run(main())

    threads = [
        threading.Thread(target=loop_thread, args=(name, first))
        for name, first in (("a", 0), ("b", 200))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    asyncio.run(stores.aclose())

    assert results == {"a": list(range(200)), "b": list(range(200, 400))}
    assert len(db.notes()) == 400


def test_a_unit_of_work_outliving_its_timed_out_loop_logs_nothing(registry, db, caplog):
    finished = threading.Event()
    stores = AsyncStores(registry)

    def slow() -> None:
        registry.get().add(Note("too late"))
        time.sleep(0.2)
        finished.set()

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stores.run(slow), 0.05)

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())  # the loop closes while the unit of work still runs
        assert finished.wait(10)
        asyncio.run(stores.aclose())

    assert caplog.text == ""
    assert db.notes() == []


def test_closing_again_after_a_cancelled_close_waits_for_the_threads(registry, db):
    slow = Held(registry, "finished")

    async def main() -> None:
        stores = AsyncStores(registry)
        running = asyncio.ensure_future(stores.run(slow))
        await slow.under_way()
        closing = asyncio.ensure_future(stores.aclose())
        await asyncio.sleep(0.05)
        closing.cancel()
        asyncio.get_running_loop().call_later(0.2, slow.proceed.set)
        await stores.aclose()
        workers = [t for t in threading.enumerate() if re.fullmatch(r"middlestorm-aio-\d+", t.name)]
        assert workers == []
        await running

    asyncio.run(main())

    assert db.notes() == ["finished"]


def test_a_storm_object_returned_to_the_coroutine_is_refused(registry, db):
    def leak() -> list[Note]:
        note = Note("stays in the worker")
        registry.get().add(note)
        return [note]

    async def main() -> None:
        async with AsyncStores(registry) as stores:
            await stores.run(leak)

    with pytest.raises(LiveObjectError, match="return plain values"):
        asyncio.run(main())
    assert db.notes() == []  # refused before the commit: nothing is saved that was reported failed


def test_closed_stores_refuse_new_work(registry):
    async def main() -> None:
        stores = AsyncStores(registry)
        await stores.aclose()
        await stores.run(lambda: None)

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(main())


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_a_bad_number_of_workers_is_refused(registry, workers):
    with pytest.raises(ConfigurationError, match="workers must be a whole number"):
        AsyncStores(registry, workers=workers)
