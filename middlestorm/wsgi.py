"""The WSGI middleware: one store per thread in ``environ``, one transaction per request.

::

    from middlestorm import MiddleStorm

    app = MiddleStorm(app, "postgres://app@localhost/app")

    def view(environ, start_response):
        store = environ["storm.store"]       # or middlestorm.current_store
        store.add(Note("hello"))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"saved"]                    # committed before the 201 is sent

The request's transaction ends as soon as its outcome is known, and once: when
the application raises, after a complete body was produced (before the status
goes to the server), when a streamed body runs out (before its last bytes go
out), when it raises, or when the server closes it early (the client left).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import Token
from types import TracebackType
from typing import Any

from transaction.interfaces import ITransactionManager

from middlestorm import context, routes, timeouts, timing
from middlestorm.databases import DatabaseSpec
from middlestorm.errors import ConfigurationError, WrongThreadError
from middlestorm.handles import ThreadStores
from middlestorm.lifecycle import (
    CommitVeto,
    abort_quietly,
    begin_transaction,
    default_commit_veto,
    end_transaction,
    under_way,
)
from middlestorm.replay import ReplayableInput
from middlestorm.retry import DEFAULT_POLICY, RetryPolicy, Verdict, classify, sqlstate
from middlestorm.routes import Mode
from middlestorm.stores import DEFAULT_STORE, StoreRegistry
from middlestorm.timeouts import Timeouts
from middlestorm.work import Next, Unit, attempts, begin_unit, end_unit, join_unit, resume_unit

__all__ = ["MiddleStorm", "decorator", "make_middleware"]

log = logging.getLogger(__name__)

Environ = dict[str, Any]
Headers = list[tuple[str, str]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: Bodies with a declared Content-Length up to this many bytes are read
#: inside the transaction, so the commit happens before the status is sent.
DEFAULT_BUFFER_LIMIT = 1024 * 1024

#: A request body up to this many bytes is kept as the app reads it, so that
#: the request can be run again after a transient failure.
DEFAULT_REPLAY_LIMIT = 8 * 1024 * 1024
#: Of which this many are kept in memory, the rest in a temporary file.
DEFAULT_REPLAY_IN_MEMORY = 256 * 1024

#: The ``environ`` key of the attempt being run: 1, then 2, … on a retry.
ATTEMPT_KEY = "middlestorm.attempt"
#: The ``environ`` key an outer layer (routing, say) may set to a
#: :class:`~middlestorm.timeouts.Timeouts` for this request alone.
TIMEOUTS_KEY = "middlestorm.timeouts"
#: The ``environ`` key naming the transaction manager of the innermost
#: MiddleStorm handling the request.
MANAGER_KEY = "middlestorm.transaction_manager"
#: The ``environ`` key of the managers whose request transaction is open, outermost first.
OPEN_MANAGERS_KEY = "middlestorm.open_transaction_managers"


class MiddleStorm:
    """Give each request this thread's Storm store and one transaction.

    :param app: the WSGI application to wrap.
    :param database: the default store's database: a Storm ``Database``, a
        URI, or a :class:`StoreRegistry` to share with code outside WSGI.
    :param key: the ``environ`` key of the default store.
    :param stores: more named stores, name mapped to a ``Database`` or URI;
        reach them through ``environ[stores_key][name]`` or ``get_store(name)``.
    :param stores_key: the ``environ`` key of the request's stores by name.
    :param transaction_manager: a thread-local transaction manager;
        ``transaction.manager`` by default.
    :param commit_veto: ``veto(environ, status, headers) -> bool``; true
        aborts. The default aborts 4xx and 5xx unless ``X-Tm: commit``.
    :param buffer_limit: a body with a Content-Length up to this many bytes
        (or a list) is produced before the commit and the status is sent
        after it; larger and unsized bodies are streamed, and the
        transaction ends when the body runs out, before its last bytes are
        handed to the server. No more than this is ever held in memory.
    :param server_timing: add a ``Server-Timing`` header with the request's
        statement count and database time to responses sent after the
        commit. Off by default: it tells clients how long queries take.
    :param retry: how a request that failed on a transient error (a
        serialization failure, a deadlock, a dropped connection, a locked
        SQLite database) is run again; ``None`` never runs it again. It is
        run again only while nothing has reached the client or been
        committed; when the policy runs out, the client gets a 503 with
        ``Retry-After``. ``environ["middlestorm.attempt"]`` numbers the attempts.
    :param replay_limit: a request body up to this many bytes is kept as the
        application reads it, so that it can be read again on a retry; a
        longer body's request is not run again.
    :param replay_in_memory: how much of a kept body stays in memory; the
        rest goes to a temporary file.
    :param timeouts: limits PostgreSQL enforces on each request's
        transaction (:class:`~middlestorm.timeouts.Timeouts`: ``statement``,
        ``idle_in_transaction``, in seconds); none by default. A request may
        change them (``environ["middlestorm.timeouts"]``, or
        ``middlestorm.timeouts.override()`` in the app); a statement cancelled
        at its limit is answered 503.
    """

    def __init__(
        self,
        app: WSGIApp,
        database: DatabaseSpec | StoreRegistry,
        key: str = "storm.store",
        *,
        stores: Mapping[str, DatabaseSpec] | None = None,
        stores_key: str = "middlestorm.stores",
        transaction_manager: ITransactionManager | None = None,
        commit_veto: CommitVeto | None = default_commit_veto,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        server_timing: bool = False,
        retry: RetryPolicy | None = DEFAULT_POLICY,
        replay_limit: int = DEFAULT_REPLAY_LIMIT,
        replay_in_memory: int = DEFAULT_REPLAY_IN_MEMORY,
        timeouts: Timeouts | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application (a callable), not {app!r}")
        if commit_veto is not None and not callable(commit_veto):
            raise TypeError(
                "commit_veto must be a callable veto(environ, status, headers) -> bool "
                f"or None, not {commit_veto!r}"
            )
        _check_keys(key, stores_key)
        if isinstance(database, StoreRegistry):
            if stores or transaction_manager is not None:
                raise ConfigurationError(
                    "pass stores and transaction_manager to the StoreRegistry, "
                    "not to MiddleStorm, when MiddleStorm is given a registry"
                )
            self.registry = database
        else:
            extra = dict(stores or {})
            if DEFAULT_STORE in extra:
                raise ConfigurationError(
                    f"{DEFAULT_STORE!r} names the default store (the database argument); "
                    "give the other stores other names"
                )
            self.registry = StoreRegistry(
                {DEFAULT_STORE: database, **extra}, transaction_manager=transaction_manager
            )
        for option, value in (
            ("buffer_limit", buffer_limit),
            ("replay_limit", replay_limit),
            ("replay_in_memory", replay_in_memory),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigurationError(f"{option} must be a whole number >= 0, not {value!r}")
        if timeouts is not None and not isinstance(timeouts, Timeouts):
            raise TypeError(
                "timeouts must be a middlestorm.Timeouts (Timeouts(statement=5), say) "
                f"or None, not {timeouts!r}"
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(
                "retry must be a middlestorm.RetryPolicy (RetryPolicy(attempts=5), say) "
                f"or None, not {retry!r}"
            )
        self.app = app
        self.key = key
        self.stores_key = stores_key
        self.commit_veto = commit_veto
        self.buffer_limit = buffer_limit
        self.server_timing = server_timing
        self.retry = retry if retry is not None else RetryPolicy(attempts=1)
        self.replay_limit = replay_limit
        self.replay_in_memory = replay_in_memory
        self.timeouts = timeouts

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.app!r} {self.registry!r}>"

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        stores = self.registry.thread_stores()
        manager = self.registry.transaction_manager
        enclosing = _still_open(environ.get(OPEN_MANAGERS_KEY))
        if enclosing is None:  # the outermost MiddleStorm: nothing to restore afterwards
            environ[self.key] = stores.default
            environ[self.stores_key] = stores
            environ[MANAGER_KEY] = manager
            environ[OPEN_MANAGERS_KEY] = (manager,)
            return self._serve(environ, start_response, stores)
        joins = manager in enclosing
        scope = _Scope(
            environ,
            {
                self.key: stores.default,
                self.stores_key: stores,
                MANAGER_KEY: manager,
                OPEN_MANAGERS_KEY: enclosing if joins else (*enclosing, manager),
            },
            stores,
        )
        with scope:
            if joins:  # an outer MiddleStorm owns the transaction; our stores join it
                result = self.app(environ, start_response)
            else:
                result = _Exchange(self, stores, environ, start_response, bind=False).run()
        return scope.around(result)

    def _serve(
        self, environ: Environ, start_response: StartResponse, stores: ThreadStores
    ) -> Iterable[bytes]:
        """Run the request, and again after a transient failure the client saw nothing of."""
        stores.requests += 1
        retries = self.retry.attempts > 1
        body = None
        original = environ
        if retries:
            body = _replayable_body(environ, self.replay_limit, self.replay_in_memory)
            original = environ.copy()  # each attempt starts from the environ the server gave
        for attempt in attempts(self.retry):
            if attempt.number > 1:
                environ = original.copy()
            environ[ATTEMPT_KEY] = attempt.number
            exchange = _Exchange(self, stores, environ, start_response, bind=True)
            unit, unit_token = begin_unit(self.registry.transaction_manager)
            exchange.unit = unit
            try:
                return exchange.run()
            except BaseException as error:
                if (
                    exchange.reached_client
                    or exchange.committed
                    or unit.committed
                    or (exchange.route is not None and exchange.route.mode is Mode.NONE)
                ):  # run again, it would do twice what reached the client or committed
                    raise
                if sqlstate(error) == timeouts.QUERY_CANCELED:
                    log.warning(
                        "%s had a statement cancelled (SQLSTATE 57014, a statement "
                        "timeout or a cancel request): %s",
                        _request_line(environ),
                        str(error).strip(),
                    )
                    return self._busy(environ, start_response)
                if not retries:
                    raise
                if body is not None and not body.rewind():
                    if classify(error) is not Verdict.TRANSIENT:
                        raise
                    log.warning(
                        "%s failed on a transient error and is not run again: its body "
                        "is over replay_limit: %s",
                        _request_line(environ),
                        str(error).strip(),
                    )
                    return self._busy(environ, start_response)
                next_step = attempt.failed(error, f"request {_request_line(environ)}")
                if next_step is Next.RETRY:
                    continue
                if next_step is Next.EXHAUSTED:
                    return self._busy(environ, start_response)
                raise
            finally:
                end_unit(unit_token)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _busy(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        """503 with Retry-After: the request kept failing transiently, or ran out of time."""
        retry_after = self.retry.retry_after
        body = f"The server is busy; try again in {retry_after} s.\n".encode()
        start_response(
            "503 Service Unavailable",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Retry-After", str(retry_after)),
            ],
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


class _Scope:
    """What a MiddleStorm inside another sets for the code it calls, undone afterwards.

    Inside the scope its stores are current and its ``environ`` keys are set;
    outside, the enclosing middleware's are again. A streamed body is run in
    the scope chunk by chunk.
    """

    def __init__(self, environ: Environ, values: dict[str, Any], stores: ThreadStores) -> None:
        self.environ = environ
        self.values = values
        self.stores = stores
        self._saved: list[dict[str, Any]] = []
        self._tokens: list[Token] = []

    def __enter__(self) -> None:
        environ = self.environ
        self._saved.append({key: environ.get(key, _MISSING) for key in self.values})
        environ.update(self.values)
        self._tokens.append(context.bind(self.stores))

    def __exit__(self, *exc_info: object) -> None:
        context.unbind(self._tokens.pop())
        for key, value in self._saved.pop().items():
            if value is _MISSING:
                self.environ.pop(key, None)
            else:
                self.environ[key] = value

    def around(self, result: Iterable[bytes]) -> Iterable[bytes]:
        if isinstance(result, (list, tuple)) or _is_file_wrapper(self.environ, result):
            return result
        return _ScopedBody(result, self)


_MISSING = object()


class _ScopedBody:
    """A body that is produced and closed inside a :class:`_Scope`."""

    def __init__(self, result: Iterable[bytes], scope: _Scope) -> None:
        self._result = result
        self._iterator: Iterator[bytes] | None = None
        self._scope = scope

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._scope:
            if self._iterator is None:
                self._iterator = iter(self._result)
            return next(self._iterator)

    def close(self) -> None:
        with self._scope:
            _close(self._result)


#: Per thread: the exchange whose transaction is open, by ``id()`` of its manager.
_open = threading.local()


def _still_open(
    managers: tuple[ITransactionManager, ...] | None,
) -> tuple[ITransactionManager, ...] | None:
    """The managers in ``environ`` whose request transaction is still open in this thread.

    An environ called with again (a retry or cascade middleware of the
    server's) still names the managers of a request that has ended.
    """
    if managers is None:
        return None
    exchanges = _open_exchanges()
    live = tuple(
        manager
        for manager in managers
        if (exchange := exchanges.get(id(manager))) is not None and not exchange.ended
    )
    return live or None


def _forget_parent_exchanges() -> None:
    """In a forked child: the parent's requests are the parent's to end."""
    _open.__dict__.pop("exchanges", None)


os.register_at_fork(after_in_child=_forget_parent_exchanges)


def _open_exchanges() -> dict[int, _Exchange]:
    try:
        return _open.exchanges
    except AttributeError:
        exchanges: dict[int, _Exchange] = {}
        _open.exchanges = exchanges
        return exchanges


class _Exchange:
    """One request and its response, and the transaction between them."""

    __slots__ = (
        "__weakref__", "_bind", "_exc_info", "_forward_at_once", "_limits", "_route_token",
        "_server_start_response", "_server_write", "_token", "broken", "closed_elsewhere",
        "committed", "ended", "environ", "headers", "middleware", "registry", "route",
        "stats", "status", "stores", "unit", "written",
    )  # fmt: skip

    def __init__(
        self,
        middleware: MiddleStorm,
        stores: ThreadStores,
        environ: Environ,
        start_response: StartResponse,
        *,
        bind: bool,
    ) -> None:
        self.middleware = middleware
        self.registry = middleware.registry
        self.stores = stores
        self.environ = environ
        self._server_start_response = start_response
        self._server_write: Callable[[bytes], object] | None = None
        self._forward_at_once = False
        self._bind = bind
        self.status: str | None = None
        self.headers: Headers = []
        self._exc_info: ExcInfo | None = None
        #: The server refused the status or a write: the client cannot have it all.
        self.broken = False
        self.ended = False
        self.committed = False
        #: Bytes sent through write(), before the returned body.
        self.written = 0
        #: The server closed the body from a thread other than the request's.
        self.closed_elsewhere = False
        self._token: Token | None = None
        self._limits: Token | None = None
        self._route_token: Token | None = None
        #: What the route asked of the transaction (:mod:`middlestorm.routes`).
        self.route: routes.Route | None = None
        #: The request's unit of work (outermost exchanges only).
        self.unit: Unit | None = None
        self.stats: timing.RequestStats | None = None

    def run(self) -> Iterable[bytes]:
        middleware = self.middleware
        manager = self.registry.transaction_manager
        exchanges = _open_exchanges()
        # A request's thread is free again: whatever it left open (on any manager,
        # inner middlewares' too) the server never closed.
        if exchanges:
            for unclosed in (
                list(exchanges.values()) if self._bind else [exchanges.get(id(manager))]
            ):
                if unclosed is not None:
                    unclosed.abandon()
        # After the abandoned ones have unbound theirs; before anything is begun,
        # so that a bad mode is refused with nothing to undo.
        self._route_token = routes.begin(self.environ, manager)
        self.route = routes.current()
        try:
            begin_transaction(manager)
        except BaseException:
            routes.end(self._route_token, self.route)
            self._route_token = None
            raise
        exchanges[id(manager)] = self
        if self._bind:
            self._token = context.bind(self.stores)
        elif self.route is None or self.route.mode is not Mode.NONE:
            join_unit(manager)  # an inner middleware's transaction: nested units join it too
        self._limits = timeouts.bind(self.environ.get(TIMEOUTS_KEY, middleware.timeouts))
        if middleware.server_timing or timing.log.isEnabledFor(logging.DEBUG):
            self.stats = timing.start()
        try:
            result = middleware.app(self.environ, self.start_response)
        except BaseException:
            self.fail()
            raise
        if self.status is not None and self._server_write is None:
            if _is_file_wrapper(self.environ, result):
                return self._commit_then_send_file(result)
            if self._body_is_complete(result):
                return self._commit_then_send(result)
        self._forward_at_once = True
        if self.status is not None:
            try:
                self._forward()
            except BaseException:
                try:
                    _close(result)
                finally:
                    self.fail()
                raise
        return _StreamedBody(result, self)

    @property
    def reached_client(self) -> bool:
        """Whether the server has the status: the response can no longer be replaced."""
        return self._server_write is not None

    # -- what the application sees ------------------------------------

    def start_response(
        self, status: str, headers: Headers, exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        _check_response(status, headers)
        self.status, self.headers = status, headers
        if self._server_write is not None or self._forward_at_once:
            try:
                self._server_write = self._server_start_response(status, headers, exc_info)
            except BaseException:
                self.broken = True
                raise
        else:
            self._exc_info = exc_info
        return self.write

    def write(self, data: bytes) -> None:
        try:
            self._forward()
            assert self._server_write is not None
            self._server_write(data)
            self.written += len(data)
        except BaseException:
            self.broken = True
            raise

    # -- sending ------------------------------------------------------

    def _body_is_complete(self, result: Iterable[bytes]) -> bool:
        if isinstance(result, (list, tuple)) or self.has_no_body():
            return True
        length = _content_length(self.headers)
        return length is not None and length <= self.middleware.buffer_limit

    def has_no_body(self) -> bool:
        """HEAD requests and 1xx, 204 and 304 responses have no body in HTTP."""
        if self.environ.get("REQUEST_METHOD") == "HEAD":
            return True
        code = (self.status or "")[:3]
        return code in ("204", "304") or code.startswith("1")

    def _commit_then_send(self, result: Iterable[bytes]) -> list[bytes]:
        try:
            try:
                body = self._produce(result)
            finally:
                _close(result)
        except BaseException:
            self.fail()
            raise
        self.succeed()
        self._forward()
        return body

    def _commit_then_send_file(self, result: Iterable[bytes]) -> Iterable[bytes]:
        """Commit, then hand the server its own file wrapper, for its fast path."""
        try:
            self.succeed()
            self._forward()
        except BaseException:
            _close(result)
            raise
        return result

    def _produce(self, result: Iterable[bytes]) -> list[bytes]:
        """The body as a list, holding no more of it than the response can send.

        A body HTTP does not send is dropped once past ``buffer_limit``; one
        with a Content-Length is cut at that length, as servers cut it.
        """
        if isinstance(result, list):
            return result
        no_body = self.has_no_body()
        budget = self.middleware.buffer_limit if no_body else _content_length(self.headers)
        if budget is None:  # a tuple: held already
            return list(result)
        body: list[bytes] = []
        size = 0
        for chunk in result:
            if size + len(chunk) <= budget:
                body.append(chunk)
                size += len(chunk)
            elif no_body:
                body, size = [], budget
            elif size < budget:
                body.append(chunk[: budget - size])
                size = budget
        return body

    def _forward(self) -> None:
        if self._server_write is None:
            assert self.status is not None
            if self.stats is not None and self.middleware.server_timing and self.ended:
                self.headers = [*self.headers, ("Server-Timing", self.stats.server_timing())]
            try:
                self._server_write = self._server_start_response(
                    self.status, self.headers, *([self._exc_info] if self._exc_info else [])
                )
            except BaseException:
                self.broken = True
                raise
            self._exc_info = None

    # -- ending the transaction -----------------------------------------

    def succeed(self) -> None:
        """End the transaction of a response produced in full: commit unless vetoed.

        :raises: what the veto or the commit raised, after aborting.
        """
        if self.ended:
            return
        if threading.get_ident() == self.stores.thread and not under_way(
            self.registry.transaction_manager
        ):  # no store (nor the app) used a transaction: none to end
            self.ended = True
            self._done("no transaction")
            return
        veto = self.middleware.commit_veto
        try:
            commit = not self.broken and (
                veto is None or not veto(self.environ, self.status or "", self.headers)
            )
        except BaseException:
            self.fail()
            raise
        if not self._owns_transaction():
            raise WrongThreadError(
                "the response ran out in a thread other than its request's, where its "
                "transaction cannot be committed; it is rolled back in the request's thread"
            )
        mode = Mode.REQUEST if self.route is None else self.route.mode
        if mode is not Mode.REQUEST:
            commit = False
            if mode is Mode.NONE and self.registry.transaction_manager.get()._resources:
                log.warning(
                    "%s has no request transaction, but left one open: it is rolled back "
                    "(do its work in units of work, such as 'with registry.transaction():')",
                    _request_line(self.environ),
                )
        routes.annotate(self.registry.transaction_manager.get(), self.environ)
        started = time.perf_counter()
        outcome = "failed to commit"
        try:
            self.committed = end_transaction(self.registry, commit=commit)
            outcome = "committed" if self.committed else "aborted"
        finally:
            if self.stats is not None:
                self.stats.commit_seconds = time.perf_counter() - started
            self._done(outcome)

    def fail(self) -> None:
        """Abort, while the reason (an error, a disconnect) is raised elsewhere."""
        if self.ended or not self._owns_transaction():
            return
        manager = self.registry.transaction_manager
        try:
            if under_way(manager):
                routes.annotate(manager.get(), self.environ)
            abort_quietly(manager)
        finally:
            self._done("aborted")

    def abandon(self) -> None:
        """Abort a streamed response the server never closed, when its thread moves on."""
        if not self.ended:
            log.warning(
                "the server never closed the response to %s (%s); its transaction "
                "is rolled back now, as the thread's next request begins",
                _request_line(self.environ),
                self.status,
            )
            self.fail()

    def _owns_transaction(self) -> bool:
        """Mark the transaction ended; false if this thread may not end it."""
        if threading.get_ident() == self.stores.thread:
            self.ended = True
            return True
        self.closed_elsewhere = True
        log.warning(
            "a response was closed in thread %s, not in thread %s that handled the request; "
            "its transaction is left to that thread, which rolls it back when its next "
            "request begins or when it ends",
            threading.get_ident(),
            self.stores.thread,
        )
        return False

    def _done(self, outcome: str) -> None:
        exchanges = _open_exchanges()
        key = id(self.registry.transaction_manager)
        if exchanges.get(key) is self:
            del exchanges[key]
        if self._token is not None:
            context.unbind(self._token)
            self._token = None
        if self._limits is not None:
            timeouts.unbind(self._limits)
            self._limits = None
        if self._route_token is not None:
            routes.end(self._route_token, self.route)
            self._route_token = None
        if self._bind:
            self.registry.request_ended(self.stores)
        stats = self.stats
        if stats is not None and timing.stop(stats):
            timing.log.debug(
                "%s -> %s, %s: %d statements in %.2f ms, commit or abort %.2f ms",
                _request_line(self.environ),
                self.status,
                outcome,
                stats.statements,
                stats.seconds * 1000,
                stats.commit_seconds * 1000,
            )


class _StreamedBody:
    """A body produced while the server sends it.

    The transaction ends when the application's body runs out, before the
    server has the last bytes: a failed commit raises instead, so the server
    cuts the response short and the client never gets a complete response
    for changes that were rolled back. With a Content-Length, the chunk that
    completes it is held until the body has run out (what comes after it,
    which no server sends, is dropped) and the commit is done.
    ``close()`` before the end (the client left) aborts.
    """

    def __init__(self, result: Iterable[bytes], exchange: _Exchange) -> None:
        self._result = result
        self._iterator: Iterator[bytes] | None = None
        self._exchange = exchange
        #: Bytes of the declared Content-Length still to come; None if none was declared.
        self._remaining: int | object | None = _UNKNOWN
        self._app_closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        exchange = self._exchange
        if exchange.ended or exchange.closed_elsewhere:
            raise StopIteration
        # The request's unit of work, for units of work the body runs: they join it.
        token = resume_unit(exchange.unit)
        try:
            return self._next(exchange)
        finally:
            end_unit(token)

    def _next(self, exchange: _Exchange) -> bytes:
        try:
            if self._iterator is None:
                self._iterator = iter(self._result)
            chunk = next(self._iterator)
            if exchange.status is None:  # the status may come with the first bytes
                if chunk:
                    raise _no_status()
                return chunk
            if self._remaining is _UNKNOWN:
                length = _content_length(exchange.headers)
                self._remaining = None if length is None else length - exchange.written
            if isinstance(self._remaining, int):
                self._remaining -= len(chunk)
                if self._remaining <= 0:  # the client has it all once this goes out
                    for _beyond in self._iterator:  # a server sends nothing past it
                        pass
                    self._finish()
            return chunk
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self.close()
            raise

    def _finish(self) -> None:
        """The body ran out: close the application's part, then commit (or raise)."""
        exchange = self._exchange
        try:
            self._close_app()
            if exchange.status is None:
                raise _no_status()
        except BaseException:
            exchange.fail()
            raise
        try:
            exchange.succeed()
        except Exception:
            log.error(
                "the commit failed while the response (%s) was being sent; the request's "
                "changes were rolled back and the response is cut short",
                exchange.status,
            )
            raise

    def close(self) -> None:
        exchange = self._exchange
        token = resume_unit(exchange.unit)
        try:
            self._close_app()
        finally:
            end_unit(token)
            exchange.fail()  # nothing left to do when the body had run out

    def _close_app(self) -> None:
        if not self._app_closed:
            self._app_closed = True
            _close(self._result)


_UNKNOWN = object()


def _no_status() -> RuntimeError:
    return RuntimeError(
        "the application returned its body without calling start_response (PEP 3333 "
        "asks for it before the body's first bytes): its transaction is rolled back"
    )


def _replayable_body(environ: Environ, limit: int, in_memory: int) -> ReplayableInput | None:
    """Put a :class:`ReplayableInput` in ``environ``, if the request has a body."""
    length = environ.get("CONTENT_LENGTH")
    if (
        (not length or length == "0")
        and "HTTP_TRANSFER_ENCODING" not in environ
        and not environ.get("wsgi.input_terminated")
    ):
        return None
    body = ReplayableInput(environ["wsgi.input"], limit=limit, in_memory=in_memory)
    environ["wsgi.input"] = body
    return body


def _request_line(environ: Environ) -> str:
    """``METHOD /path`` of the request, and its user when known, for logs."""
    line = f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"
    user = environ.get(routes.USER_KEY) or environ.get("REMOTE_USER")
    return f"{line} (user {user})" if user else line


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _is_file_wrapper(environ: Environ, result: Iterable[bytes]) -> bool:
    """Whether ``result`` is the server's ``wsgi.file_wrapper``, which it may send fast."""
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(result, wrapper)


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


def _check_response(status: object, headers: Iterable[Any]) -> None:
    """Refuse, before anything is committed, a status or headers no server may send."""
    if not isinstance(status, str) or _breaks_line(status):
        raise ValueError(f"the response status must be a one-line string, not {status!r}")
    for header in headers:
        try:
            name, value = header
        except (TypeError, ValueError):
            raise TypeError(
                f"a response header must be a (name, value) pair, not {header!r}"
            ) from None
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"response header names and values must be str: {header!r}")
        if _breaks_line(name + value):
            # The value is left out: it may hold what the client must not see.
            raise ValueError(
                f"the response header {name!r} holds a line break or NUL character, "
                "which would split the response; take them out (quote or encode the value)"
            )


def _breaks_line(text: str) -> bool:
    """Whether ``text`` holds what no header name or value may hold (PEP 3333; every
    server refuses it): a line break or NUL, which would split the response."""
    return "\n" in text or "\r" in text or "\0" in text


def _check_keys(key: object, stores_key: object) -> None:
    for option, value in (("key", key), ("stores_key", stores_key)):
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{option} must be a non-empty string, not {value!r}")
        if value in (MANAGER_KEY, OPEN_MANAGERS_KEY) or value.startswith("wsgi."):
            raise ConfigurationError(
                f"{option}={value!r} is an environ key that WSGI or middlestorm uses for "
                "something else; choose another"
            )
    if key == stores_key:
        raise ConfigurationError(
            f"key and stores_key are both {key!r}: the default store and the stores by "
            "name need environ keys of their own"
        )


def decorator(
    database: DatabaseSpec | StoreRegistry, key: str = "storm.store", **options: Any
) -> Callable[[WSGIApp], MiddleStorm]:
    """Wrap the decorated WSGI application in :class:`MiddleStorm`.

    ``@decorator("sqlite:app.db")`` above ``def app(environ, start_response)``
    is ``app = MiddleStorm(app, "sqlite:app.db")``; the middleware keeps the
    application's ``__name__`` and ``__doc__``, and ``__wrapped__`` is the application.
    """

    def wrap(app: WSGIApp) -> MiddleStorm:
        middleware = MiddleStorm(app, database, key, **options)
        functools.update_wrapper(middleware, app, updated=())
        return middleware

    return wrap


def make_middleware(
    app: WSGIApp,
    global_conf: Mapping[str, str],
    db_uri: str | None = None,
    key: str = "storm.store",
) -> MiddleStorm:
    """The Paste Deploy filter factory (``egg:middlestorm#middlestorm``)::

        [filter:storm]
        use = egg:middlestorm#middlestorm
        db_uri = postgres://app@localhost/app

    ``db_uri`` may also come from the ``[DEFAULT]`` section.
    """
    db_uri = db_uri or global_conf.get("db_uri")
    if not db_uri:
        raise ConfigurationError(
            "the middlestorm filter needs a database: add 'db_uri = <URI>' to its "
            "section or to [DEFAULT]"
        )
    return MiddleStorm(app, db_uri, key)
