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

The pool is a :class:`middlestorm.pool.WorkerPool`, not Twisted's
``ThreadPool``, which costs more than twice as much to hand a call to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from middlestorm.pool import Outbox, WorkerPool
from middlestorm.retry import DEFAULT_POLICY, RetryPolicy
from middlestorm.timeouts import Timeouts
from middlestorm.work import Cancellation, check_workers, run_in_worker

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["DeferredStores"]


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
        self._pool = WorkerPool(self.workers, "middlestorm")
        #: What the pool's threads hand the reactor: each call's outcome.
        self._outbox = Outbox(reactor.callFromThread)
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def run(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` as a unit of work in the pool; its result, deferred.

        Call it in the reactor's thread. The errback gets a ``LiveObjectError``
        when the function returns a Storm object, store or result set, and a
        ``RuntimeError`` once the pool is stopped (the reactor shut down).
        """
        cancelled = Cancellation()
        result: Deferred[Any] = Deferred(cancelled.set)
        put = self._outbox.put

        def done(succeeded: bool, outcome: Any) -> None:  # in the worker thread
            if not succeeded:
                outcome = Failure(outcome, type(outcome), outcome.__traceback__)
            put(_fire, result, succeeded, outcome)

        try:
            self._pool.submit(
                done, run_in_worker, (self.registry, cancelled, function, *args),
                {"policy": self.policy, "timeouts": self.timeouts, **kwargs},
            )  # fmt: skip
        except RuntimeError as error:
            return fail(error)
        return result

    def stop(self) -> None:
        """Refuse new units of work, run the ones under way and waiting, end the threads,
        close their connections (the reactor's shutdown calls it)."""
        self._pool.stop()
        self._outbox.flush()  # the reactor stops: their Deferreds fire now or never
        self.registry.close_spare_connections()  # what the ended threads handed over


def _fire(result: Deferred[Any], succeeded: bool, outcome: Any) -> None:
    """Give ``result`` the unit of work's outcome, unless it was cancelled meanwhile."""
    if result.called:
        return
    if succeeded:
        result.callback(outcome)
    else:
        result.errback(outcome)
