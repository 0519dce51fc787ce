"""Worker threads for event loops, and the outbox that hands their outcomes back."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref

import pytest

from middlestorm.pool import Outbox, WorkerPool


class Outcomes:
    """What the pool hands ``done``: (succeeded, outcome) in order, and when all are in."""

    def __init__(self, expected: int) -> None:
        self.seen: list[tuple[bool, object]] = []
        self._expected = expected
        self._lock = threading.Lock()
        self.all_in = threading.Event()

    def done(self, succeeded: bool, outcome: object) -> None:
        with self._lock:
            self.seen.append((succeeded, outcome))
            if len(self.seen) == self._expected:
                self.all_in.set()


def test_calls_run_in_no_more_threads_than_the_pool_has():
    pool = WorkerPool(4, "test")
    outcomes = Outcomes(200)

    def work() -> int:
        time.sleep(0.001)
        return threading.get_ident()

    for _ in range(200):
        pool.submit(outcomes.done, work, (), {})
    assert outcomes.all_in.wait(10)
    pool.stop()

    assert all(succeeded for succeeded, _ in outcomes.seen)
    assert 1 < len({thread for _, thread in outcomes.seen}) <= 4


def test_a_call_made_once_the_last_one_finished_reuses_its_thread():
    pool = WorkerPool(8, "test")
    threads = set()
    for _ in range(20):
        outcomes = Outcomes(1)
        pool.submit(outcomes.done, threading.get_ident, (), {})
        assert outcomes.all_in.wait(10)
        threads.add(outcomes.seen[0][1])
    pool.stop()

    assert len(threads) == 1


def test_stop_runs_the_calls_still_waiting_then_ends_the_threads():
    pool = WorkerPool(1, "test")
    outcomes = Outcomes(10)
    for number in range(10):
        pool.submit(outcomes.done, lambda number=number: time.sleep(0.01) or number, (), {})

    pool.stop()

    assert outcomes.seen == [(True, number) for number in range(10)]
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("test-")]


def test_a_call_that_raises_hands_done_its_exception_and_the_thread_serves_on():
    pool = WorkerPool(1, "test")
    outcomes = Outcomes(2)
    error = KeyError("missing")

    def fail() -> None:
        raise error

    pool.submit(outcomes.done, fail, (), {})
    pool.submit(outcomes.done, str, (42,), {})
    assert outcomes.all_in.wait(10)
    pool.stop()

    assert outcomes.seen == [(False, error), (True, "42")]


@pytest.mark.parametrize("error", [RuntimeError("the loop is gone"), SystemExit(3)])
def test_a_done_that_raises_is_logged_and_the_thread_serves_on(caplog, error):
    pool = WorkerPool(1, "test")
    outcomes = Outcomes(1)

    def broken_done(succeeded: bool, outcome: object) -> None:
        raise error

    with caplog.at_level(logging.ERROR, logger="middlestorm.pool"):
        pool.submit(broken_done, int, (), {})
        pool.submit(outcomes.done, int, ("7",), {})
        assert outcomes.all_in.wait(10)
    pool.stop()

    assert outcomes.seen == [(True, 7)]
    assert "could not be handed back" in caplog.text


def test_a_stopped_pool_refuses_calls():
    pool = WorkerPool(2, "test")
    pool.submit(Outcomes(1).done, int, (), {})
    pool.stop()

    with pytest.raises(RuntimeError, match="stopped"):
        pool.submit(Outcomes(1).done, int, (), {})


class Argument:
    """An argument whose end a weak reference sees."""


def test_nothing_of_a_failed_call_outlives_its_handing_back():
    pool = WorkerPool(1, "test")
    outcomes = Outcomes(1)
    argument = Argument()
    alive = weakref.ref(argument)

    def fail(argument: Argument) -> None:
        raise ValueError("bad")

    gc.disable()  # freed by reference counting, not found later by the collector
    try:
        pool.submit(outcomes.done, fail, (argument,), {})
        del argument
        assert outcomes.all_in.wait(10)
        outcomes.seen.clear()
        pool.stop()
        assert alive() is None
    finally:
        gc.enable()


def test_outcomes_put_from_worker_threads_run_in_the_loops_thread_in_order():
    ran: list[tuple[int, int]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        outbox = Outbox(loop.call_soon_threadsafe)
        finished = asyncio.Event()

        def put_all() -> None:
            for number in range(500):
                outbox.put(lambda number=number: ran.append((number, threading.get_ident())))
            outbox.put(finished.set)

        worker = threading.Thread(target=put_all)
        worker.start()
        await asyncio.wait_for(finished.wait(), 10)
        worker.join()

    loop_thread = threading.get_ident()
    asyncio.run(main())

    assert [number for number, _ in ran] == list(range(500))
    assert {thread for _, thread in ran} == {loop_thread}


def test_calls_put_while_a_wake_up_is_on_its_way_share_it():
    loop = asyncio.new_event_loop()
    wake_ups = []

    def wake(callback) -> None:
        wake_ups.append(callback)
        loop.call_soon_threadsafe(callback)

    outbox = Outbox(wake)
    ran: list[int] = []
    try:
        for number in range(100):  # the loop is not running: nothing is taken yet
            outbox.put(ran.append, number)
        loop.run_until_complete(asyncio.sleep(0))
        outbox.put(ran.append, 100)
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()

    assert ran == list(range(101))
    assert len(wake_ups) == 2


def test_a_put_to_a_closed_loop_raises_every_time():
    loop = asyncio.new_event_loop()
    loop.close()
    outbox = Outbox(loop.call_soon_threadsafe)

    for _ in range(2):
        with pytest.raises(RuntimeError, match="closed"):
            outbox.put(print, "never")
