"""The request's stores belong to the request's thread; any other thread is refused."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import pytest
import transaction

from middlestorm import (
    StoreRegistry,
    UnknownStoreError,
    WrongThreadError,
    current_store,
    use_registry,
)
from tests.helpers import call
from tests.models import Note


@pytest.fixture
def served(middleware):
    """Serve ``app`` with MiddleStorm on the test database; ``served.workers`` is a pool."""
    workers = ThreadPoolExecutor(1, thread_name_prefix="worker")

    def serve(app, **options):
        return call(middleware(app, **options))

    serve.workers = workers
    yield serve
    workers.shutdown()


def handing_to_a_worker(use, workers):
    """An app that writes a note, then hands its store to a worker thread that uses it."""

    def app(environ, start_response):
        environ["storm.store"].add(Note("from the request"))
        outcome = workers.submit(use, environ).exception(30)
        start_response("201 Created", [])
        return [repr(outcome).encode()]

    return app


def test_the_requests_store_used_in_a_worker_thread_raises_naming_both_threads(db, served, tracer):
    sent_by_worker = []

    def use(environ):
        before = tracer.raw  # the request's thread waits meanwhile: only the worker sends
        try:
            environ["storm.store"].add(Note("from the worker"))
            environ["storm.store"].flush()
        finally:
            sent_by_worker.append(tracer.raw - before)

    response = served(handing_to_a_worker(use, served.workers))

    assert response.data.startswith(b"WrongThreadError(")
    assert b"MainThread" in response.data and b"worker_0" in response.data
    assert sent_by_worker == [0]  # refused before any statement was sent
    assert db.notes() == ["from the request"]
    assert db.idle_in_transaction() == 0


def test_the_requests_stores_by_name_used_in_a_worker_thread_raise(db, served):
    def use(environ):
        environ["middlestorm.stores"].get("main").find(Note).count()

    response = served(handing_to_a_worker(use, served.workers))

    assert response.data.startswith(b"WrongThreadError(")
    assert db.idle_in_transaction() == 0


def test_current_store_in_a_worker_running_the_requests_context_raises(db, served):
    def use(environ):
        current_store.find(Note).count()

    def app(environ, start_response):
        context = contextvars.copy_context()  # as asyncio.to_thread and some pools do
        outcome = served.workers.submit(context.run, use, environ).exception(30)
        start_response("200 OK", [])
        return [repr(outcome).encode()]

    assert served(app).data.startswith(b"WrongThreadError(")
    assert db.idle_in_transaction() == 0


def test_current_store_in_asyncio_to_thread_raises(db, served):
    def app(environ, start_response):
        async def count() -> int:
            return await asyncio.to_thread(lambda: current_store.find(Note).count())

        try:
            outcome = repr(asyncio.run(count()))
        except WrongThreadError as error:
            outcome = repr(error)
        start_response("200 OK", [])
        return [outcome.encode()]

    assert served(app).data.startswith(b"WrongThreadError(")


def test_the_stores_by_name_are_reachable_by_subscript_in_the_requests_thread(db, served):
    seen = {}

    def app(environ, start_response):
        stores = environ["middlestorm.stores"]
        seen["same"] = stores["main"] is stores.get("main") is stores.get()
        seen["names"] = (list(stores), "main" in stores, "nope" in stores)
        try:
            stores["nope"]
        except UnknownStoreError as error:
            seen["unknown"] = str(error)
        start_response("200 OK", [])
        return [b""]

    served(app)

    assert seen == {
        "same": True,
        "names": (["main"], True, False),
        "unknown": "no store named 'nope'; the configured stores are 'main'",
    }


def test_a_worker_thread_may_use_a_store_of_its_own_from_the_registry(db, served):
    def app(environ, start_response):
        registry = environ["middlestorm.stores"].registry

        def own_unit_of_work():
            registry.get().add(Note("the worker's own"))
            transaction.commit()
            registry.release()

        served.workers.submit(own_unit_of_work).result(30)
        start_response("200 OK", [])
        return [b""]

    served(app)

    assert db.notes() == ["the worker's own"]


def test_use_registry_binds_this_threads_stores_only(db):
    registry = StoreRegistry({"main": db.uri})
    with use_registry(registry), ThreadPoolExecutor(1) as pool:
        context = contextvars.copy_context()
        outcome = pool.submit(context.run, lambda: current_store.find(Note).count())
        assert isinstance(outcome.exception(30), WrongThreadError)
        assert current_store.find(Note).count() == 0
    transaction.abort()
    registry.release()
