"""Twisted: units of work in a thread pool of their own, as Deferreds.

The reactor's thread never touches a store. A function runs as a unit of
work (:func:`middlestorm.work.run_in_transaction`: the registry's stores,
its transaction, the retry policy) in a thread of a pool this module owns,
and its result, a plain value, comes back as a ``Deferred``; a failure as
its errback::

    from middlestorm.twisted import DeferredStores

    stores = DeferredStores(registry, workers=8)

    def avatar(login):
        user = registry.get().find(User, login=login).one()
        return user.avatar_line()   # a plain value: Storm objects stay in the thread

    d = stores.run(avatar, "alice")

The pool starts with the first call and stops when the reactor shuts down:
the calls waiting are run, its threads end, their connections are closed,
nothing keeps the process from exiting. Cancelling the ``Deferred`` rolls the
unit of work back unless its COMMIT is already under way. It needs Twisted
(``middlestorm[twisted]``).

The pool is a queue and the threads that take calls from it: handing it a
call costs less than half what handing one to Twisted's ``ThreadPool`` costs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from middlestorm.retry import DEFAULT_POLICY, RetryPolicy
from middlestorm.timeouts import Timeouts
from middlestorm.work import Cancellation, check_workers, run_in_worker

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["DeferredStores"]

log = logging.getLogger(__name__)


class DeferredStores:
    """A thread pool that runs units of work in a registry's stores, for the reactor.

    :param reactor: the reactor (Twisted's global one by default).
    :param workers: how many threads (and so stores and connections per
        database) at most.
    :param policy: the retry policy of every unit of work.
    :param timeouts: PostgreSQL limits of every unit of work's transaction.
    """

    def __init__(
        self,
        registry: StoreRegistry,
        *,
        reactor: Any = None,
        workers: int = 8,
        policy: RetryPolicy = DEFAULT_POLICY,
        timeouts: Timeouts | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.registry = registry
        self.reactor = reactor
        self.policy = policy
        self.timeouts = timeouts
        self.workers = check_workers(workers)
        self._pool: _Pool | None = None

    def run(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` as a unit of work in the pool; its result, deferred.

        The errback gets a ``LiveObjectError`` when it returns a Storm object,
        store or result set.
        """
        pool = self._pool
        if pool is None:
            pool = self._pool = _Pool(self.workers, self.reactor.callFromThread)
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        cancelled = Cancellation()
        result: Deferred[Any] = Deferred(cancelled.set)
        pool.submit(
            result, run_in_worker, (self.registry, cancelled, function, *args),
            {"policy": self.policy, "timeouts": self.timeouts, **kwargs},
        )  # fmt: skip
        return result

    def stop(self) -> None:
        """Run the units of work under way and waiting, end the threads, close their
        connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        self.registry.close_spare_connections()  # what the ended threads handed over


_Call = tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Pool:
    """Up to ``size`` threads that run calls from one queue and hand each outcome to
    ``call_from_thread`` (the reactor's), as a Deferred's callback or errback.

    A thread is started for a call while fewer than ``size`` run and none is idle.
    """

    def __init__(self, size: int, call_from_thread: Callable[..., Any]) -> None:
        self._size = size
        self._call_from_thread = call_from_thread
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: Threads done with their call and not yet promised another.
        self._idle = 0

    def submit(
        self,
        result: Deferred[Any],
        function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1  # an idle thread takes it
            elif len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"middlestorm-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        self._queue.put((result, function, args, kwargs))

    def _work(self) -> None:
        take = self._queue.get
        while (call := take()) is not None:
            self._run(*call)
            call = None  # nothing of a call outlives it in an idle thread

    def _run(
        self,
        result: Deferred[Any],
        function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        deliver: Callable[[Any], None]
        try:
            outcome = function(*args, **kwargs)
        except BaseException as error:
            deliver, outcome = result.errback, Failure(error, type(error), error.__traceback__)
        else:
            deliver = result.callback
        with self._lock:  # idle before the reactor hears: a call it makes next reuses this thread
            self._idle += 1
        try:
            self._call_from_thread(deliver, outcome)
        except Exception:  # the reactor is gone; the thread stays for the calls waiting
            log.exception("the outcome of a unit of work could not be handed to the reactor")

    def stop(self) -> None:
        """Run the calls waiting, then end the threads, and wait for them."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()
