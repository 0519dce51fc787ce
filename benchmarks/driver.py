"""Calling a WSGI app in this process, as a threaded server would, without HTTP.

A :class:`Workers` pool keeps its threads between runs, like a server's
thread pool, so per-thread stores and connections are made once (in the
warm-up), not in the timed runs.
"""

from __future__ import annotations

import io
import itertools
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from werkzeug.test import EnvironBuilder

from benchmarks.contenders import Environ, Route, WSGIApp


def base_environ(route: Route) -> Environ:
    """A complete WSGI environ for one request to ``route`` (copied for each call)."""
    environ = EnvironBuilder(path=route.path, method=route.method).get_environ()
    environ.update({"wsgi.multithread": True, "wsgi.multiprocess": False})
    return environ


def call(app: WSGIApp, environ: Environ) -> str:
    """One request: the status; the body is consumed and closed as a server would."""
    status = ""

    def start_response(value: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        nonlocal status
        status = value
        return lambda data: None

    body = app(environ, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return status


@dataclass
class Run:
    """One timed run: wall-clock seconds for ``requests`` requests, ``errors`` of them not 200."""

    seconds: float
    requests: int
    errors: int
    first_error: str = ""

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


class Workers:
    """``size`` long-lived threads that call an app together."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(size)]
        self._done: queue.SimpleQueue[tuple[int, str, BaseException | None]] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, args=(jobs,), daemon=True, name=f"worker-{n}")
            for n, jobs in enumerate(self._jobs)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, jobs: queue.SimpleQueue[Any]) -> None:
        while (job := jobs.get()) is not None:
            app, environs, count = job
            errors = 0
            first = ""
            failure: BaseException | None = None
            try:
                for base in itertools.islice(itertools.cycle(environs), count):
                    environ = dict(base)
                    environ["wsgi.input"] = io.BytesIO(b"")
                    try:
                        status = call(app, environ)
                    except Exception as error:
                        status = f"{type(error).__name__}: {error}"
                    if not status.startswith("200"):
                        errors += 1
                        first = first or status
            except BaseException as error:  # reported to the caller
                failure = error
            self._done.put((errors, first, failure))

    def run(self, app: WSGIApp, environs: Sequence[Environ], requests: int) -> Run:
        """Call ``app`` ``requests`` times, split over the threads, cycling through ``environs``."""
        shares = [requests // self.size + (n < requests % self.size) for n in range(self.size)]
        started = time.perf_counter()
        for jobs, share in zip(self._jobs, shares, strict=True):
            jobs.put((app, list(environs), share))
        errors, first = 0, ""
        for _ in shares:
            count, error, failure = self._done.get()
            if failure is not None:
                raise failure
            errors += count
            first = first or error
        return Run(time.perf_counter() - started, requests, errors, first)

    def close(self) -> None:
        for jobs in self._jobs:
            jobs.put(None)
        for thread in self._threads:
            thread.join(30)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
