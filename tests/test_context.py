"""current_store: the request's store without passing environ around."""

from __future__ import annotations

import pytest

from middlestorm import (
    MiddleStorm,
    NoRequestError,
    StoreRegistry,
    current_store,
    get_store,
    use_registry,
)
from tests.helpers import call, start
from tests.models import Note


def deep_in_the_app(body: str) -> None:
    current_store.add(Note(body))


def test_current_store_is_the_requests_store(db):
    seen = []

    def app(environ, start_response):
        deep_in_the_app("from deep down")
        seen.append(environ["storm.store"]._get_current_object() is get_store())
        start_response("200 OK", [])
        return [b""]

    middleware = MiddleStorm(app, db.uri)
    call(middleware)
    middleware.registry.release()

    assert seen == [True]
    assert db.notes() == ["from deep down"]


def test_current_store_outside_a_request_raises_a_clear_error():
    with pytest.raises(NoRequestError, match="outside|no middlestorm store is active"):
        current_store.find(Note)


def streaming_a_note(body_text: str):
    """An app whose streamed body adds a note through ``current_store``."""

    def app(environ, start_response):
        start_response("200 OK", [])

        def body():
            deep_in_the_app(body_text)
            yield b"done"

        return body()

    return app


def test_current_store_works_while_a_streamed_body_is_produced(db):
    middleware = MiddleStorm(streaming_a_note("streamed"), db.uri)
    _, body = start(middleware)
    assert list(body) == [b"done"]
    body.close()
    middleware.registry.release()

    assert db.notes() == ["streamed"]
    with pytest.raises(NoRequestError):
        get_store()


def test_use_registry_binds_a_registry_outside_wsgi(db):
    import transaction

    registry = StoreRegistry({"main": db.uri})
    with use_registry(registry):
        deep_in_the_app("from a worker")
        transaction.commit()
    registry.release()

    assert db.notes() == ["from a worker"]
    with pytest.raises(NoRequestError):
        get_store()


def test_a_body_closed_from_another_context_still_ends_its_transaction(db):
    import contextvars

    middleware = MiddleStorm(streaming_a_note("closed elsewhere"), db.uri)

    def serve() -> None:  # in a context of its own, which keeps what the request set
        _, body = start(middleware)
        assert list(body) == [b"done"]
        contextvars.Context().run(body.close)  # a server closing from a fresh context

    contextvars.copy_context().run(serve)
    middleware.registry.release()

    assert db.notes() == ["closed elsewhere"]
    with pytest.raises(NoRequestError):
        get_store()
