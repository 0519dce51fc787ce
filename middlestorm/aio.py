"""asyncio: await units of work run in worker threads of their own.

Storm is synchronous and its stores belong to threads, so a coroutine does
not use a store itself: it awaits a function run as a unit of work
(:func:`middlestorm.work.run_in_transaction`: the registry's stores, its
transaction, the retry policy) in one of a bounded set of worker threads,
each with its own stores::

    stores = AsyncStores(registry, workers=8)

    def rename(note_id, body):
        note = registry.get().get(Note, note_id)
        note.body = body
        return note.body              # a plain value: Storm objects stay in the worker

    async def handler():
        body = await stores.run(rename, 1, "new body")
        ...
    await stores.aclose()             # or: async with AsyncStores(registry) as stores:

Cancelling the awaiting task rolls the unit of work back: it never commits
after its caller stopped waiting (a COMMIT already under way completes).
The threads are a :class:`middlestorm.pool.WorkerPool`, which costs less than
half what a ``ThreadPoolExecutor`` costs to hand a call to.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from middlestorm.pool import Outbox, WorkerPool
from middlestorm.retry import DEFAULT_POLICY, RetryPolicy
from middlestorm.timeouts import Timeouts
from middlestorm.work import Cancellation, check_workers, run_in_worker

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["AsyncStores"]

T = TypeVar("T")


class AsyncStores:
    """Worker threads that run units of work in a registry's stores, for coroutines to await.

    :param workers: how many threads (and so stores and connections per
        database) at most.
    :param policy: the retry policy of every unit of work.
    :param timeouts: PostgreSQL limits of every unit of work's transaction.
    """

    def __init__(
        self,
        registry: StoreRegistry,
        *,
        workers: int = 8,
        policy: RetryPolicy = DEFAULT_POLICY,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.timeouts = timeouts
        self._pool = WorkerPool(check_workers(workers), "middlestorm-aio")
        #: What the threads hand each event loop that awaits units of work.
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False
        self._stopped = threading.Event()

    async def run(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``function(*args, **kwargs)`` as a unit of work in a worker thread; its result.

        :raises LiveObjectError: when it returns a Storm object, store or result set.
        :raises RuntimeError: after :meth:`aclose`.
        """
        if self._closed:
            raise RuntimeError("these AsyncStores are closed")
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.get(loop)
        if outbox is None:
            outbox = self._outboxes[loop] = Outbox(loop.call_soon_threadsafe)
        put = outbox.put
        future: asyncio.Future[T] = loop.create_future()
        cancelled = _Abandoned(future)

        def done(succeeded: bool, outcome: Any) -> None:  # in the worker thread
            if not future.cancelled():  # its loop may be gone: nobody waits
                put(_settle, future, succeeded, outcome)

        self._pool.submit(
            done, run_in_worker, (self.registry, cancelled, function, *args),
            {"policy": self.policy, "timeouts": self.timeouts, **kwargs},
        )  # fmt: skip
        return await future  # cancelling the task cancels it: the worker rolls back

    async def aclose(self) -> None:
        """Wait for the units of work under way and waiting, end the threads, close their
        connections. Called again (after a cancelled call, say), it waits all the same."""
        loop = asyncio.get_running_loop()
        if not self._closed:
            self._closed = True
            threading.Thread(target=self._shutdown, name="middlestorm-aio-close").start()
        await loop.run_in_executor(None, self._stopped.wait)

    def _shutdown(self) -> None:
        try:
            self._pool.stop()
            self.registry.close_spare_connections()  # what the ended threads handed over
        finally:
            self._stopped.set()

    async def __aenter__(self) -> AsyncStores:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Abandoned(Cancellation):
    """Set once the awaiting task is cancelled: its future is cancelled the moment the
    task is, while the task itself hears of it only when the loop next runs it."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        super().__init__()
        self._future = future

    def is_set(self) -> bool:
        return self._future.cancelled()


def _settle(future: asyncio.Future[Any], succeeded: bool, outcome: Any) -> None:
    """Give ``future`` the unit of work's outcome, unless its awaiter was cancelled."""
    if future.done():
        return
    if succeeded:
        future.set_result(outcome)
    elif isinstance(outcome, StopIteration):  # a future refuses it, as a coroutine would
        error = RuntimeError("the unit of work raised StopIteration")
        error.__cause__ = outcome
        future.set_exception(error)
    else:
        future.set_exception(outcome)
