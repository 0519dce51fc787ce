"""Worker threads for units of work run on behalf of an event loop (Twisted, asyncio).

A queue and up to ``size`` threads that take calls from it: handing a call to
one costs less than half what Twisted's ``ThreadPool`` or a
``ThreadPoolExecutor`` costs (no future, condition or coordinator per call),
and with eight threads running units of work under the GIL that difference
was most of what :mod:`middlestorm.twisted` and :mod:`middlestorm.aio` added
to a hand-written ``deferToThreadPool`` or ``run_in_executor``.

Each thread keeps its own stores (a registry gives each thread its own), so
the number of threads bounds the connections. The threads are daemons:
a pool nobody stopped never keeps the process from exiting.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Done", "Outbox", "WorkerPool"]

log = logging.getLogger(__name__)

#: ``done(succeeded, outcome)``, called in the worker thread with the call's
#: result, or the exception it raised.
Done = Callable[[bool, Any], None]

Args = tuple[Any, ...]
Kwargs = dict[str, Any]
_Call = tuple[Done, Callable[..., Any], Args, Kwargs]

#: Seconds before another thread is started after one failed to.
_THREAD_RETRY = 1.0


class WorkerPool:
    """Up to ``size`` threads that run calls from one queue, in the order given.

    A thread is started for a call while fewer than ``size`` run and none is
    idle; threads run until :meth:`stop`, after which calls are refused.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: Threads done with their call and not yet promised another.
        self._idle = 0
        self._stopped = False
        #: After a thread failed to start, no other is tried before this time.
        self._no_thread_until = 0.0

    def submit(self, done: Done, function: Callable[..., Any], args: Args, kwargs: Kwargs) -> None:
        """Run ``function(*args, **kwargs)`` in a worker thread, then ``done`` there.

        :raises RuntimeError: once the pool is stopped, or when no thread can be
            started and none runs.
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"the {self.name} worker threads are stopped")
            if self._idle:
                self._idle -= 1  # an idle thread takes it
            elif len(self._threads) < self.size:
                self._start_thread()
            self._queue.put((done, function, args, kwargs))

    def _start_thread(self) -> None:
        if self._threads and time.monotonic() < self._no_thread_until:
            return
        thread = threading.Thread(
            target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # out of threads: the ones running take the call later
            if not self._threads:
                raise
            log.warning(
                "no more %s worker threads could be started now; %d serve on",
                self.name,
                len(self._threads),
                exc_info=True,
            )
            self._no_thread_until = time.monotonic() + _THREAD_RETRY
            return
        self._threads.append(thread)

    def stop(self) -> None:
        """Refuse new calls, run the calls waiting, end the threads, and wait for them.

        A call that waits for the thread calling ``stop()`` (a Twisted
        ``blockingCallFromThread`` to a reactor that is stopping) never ends.
        """
        with self._lock:
            self._stopped = True
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        take = self._queue.get
        while (call := take()) is not None:
            self._run(*call)
            call = None  # nothing of a call outlives it in an idle thread

    def _run(self, done: Done, function: Callable[..., Any], args: Args, kwargs: Kwargs) -> None:
        try:
            outcome, succeeded = function(*args, **kwargs), True
        except BaseException as error:
            outcome, succeeded = error, False
        with self._lock:  # idle before the caller hears: a call it makes next reuses this thread
            self._idle += 1
        try:
            done(succeeded, outcome)
        except BaseException:  # the event loop is gone; the thread stays for the calls waiting
            log.exception("the outcome of a call could not be handed back to its event loop")
        finally:
            # A failure's traceback holds this frame: without these, the call's
            # arguments and outcome would wait for the garbage collector.
            del done, function, args, kwargs, outcome


class Outbox:
    """Calls made from worker threads to run in an event loop's thread, in order, with one
    wake-up of the loop for all the calls made while one is on its way.

    :param call_soon_threadsafe: how the loop takes a call from another thread
        (``reactor.callFromThread``, ``loop.call_soon_threadsafe``).
    """

    def __init__(self, call_soon_threadsafe: Callable[..., Any]) -> None:
        self._wake = call_soon_threadsafe
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._woken = False

    def put(self, function: Callable[..., Any], *args: Any) -> None:
        """Have the loop's thread call ``function(*args)`` (from any thread)."""
        with self._lock:
            self._calls.append((function, args))
            if self._woken:
                return
            self._woken = True
        try:
            self._wake(self.flush)
        except BaseException:  # the loop is closed: nothing put here can ever run
            with self._lock:
                self._woken = False
                self._calls.clear()
            raise

    def flush(self) -> None:
        """Run the calls put so far, in the loop's thread: when it wakes, or now, when it
        will not run again."""
        with self._lock:
            self._woken = False  # calls put from now on wake the loop again
            calls, self._calls = self._calls, collections.deque()
        for function, args in calls:
            try:
                function(*args)
            except Exception:
                log.exception("handing an outcome back to the event loop failed")
