"""Tests whose database work is rolled back, even what the code under test commits.

A pytest plugin, registered only when a ``conftest.py`` asks for it::

    pytest_plugins = ["middlestorm.testing"]

    @pytest.fixture
    def storm_app():
        return MiddleStorm(notes_app, "postgres://app@localhost/app_test")

    def test_a_note_is_saved(storm_client):
        assert storm_client.post("/notes", data={"body": "hi"}).status_code == 201

Its fixtures:

``storm_registry``
    the registry whose stores are rolled back: ``storm_app.registry``
    unless a ``conftest.py`` defines it itself (for code outside WSGI).
``storm_rollback``
    the test runs inside :func:`rolled_back` for ``storm_registry``.
``storm_client``
    a :class:`BufferedClient` of ``storm_app`` inside ``storm_rollback``.

:func:`rolled_back` works without pytest too. It holds one transaction open
in each of the calling thread's stores; a COMMIT becomes the release of a
savepoint and a new one, a ROLLBACK a rollback to it, and at the end all of
it is rolled back. So the code under test commits, rolls back and sees its
own writes as it would, and nothing reaches the database. Only this thread's
stores take part: a request served by a real server in another thread, or a
unit of work run in a worker thread, commits for real, and so do stores
opened afresh after ``registry.release()`` in the block. What a savepoint does
not do as a COMMIT does is not tested this way: deferred constraints are
checked only at the end (never, as it is rolled back), and a two-phase
registry is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
from storm.store import Store
from storm.tracer import trace
from werkzeug.test import Client

from middlestorm.errors import ConfigurationError, MiddleStormError
from middlestorm.timeouts import Timeouts, is_postgres

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["BufferedClient", "rolled_back"]

#: The savepoint each store's commits and rollbacks go back to.
SAVEPOINT = "middlestorm_testing"


@contextmanager
def rolled_back(registry: StoreRegistry) -> Iterator[StoreRegistry]:
    """Run the block with the calling thread's stores of ``registry`` rolled back afterwards.

    A transaction under way in the registry's manager is aborted first.
    """
    if registry.two_phase:
        raise ConfigurationError(
            "rolled_back() cannot hold a two-phase registry's transactions: PREPARE "
            "TRANSACTION would prepare, and COMMIT PREPARED commit, the test's own; test "
            "with a registry of the same databases made without two_phase=True"
        )
    manager = registry.transaction_manager
    manager.abort()
    stores = [registry.get(name) for name in registry.names]
    held = [_hold(store) for store in stores]
    try:
        yield registry
    finally:
        try:
            manager.abort()
        finally:
            for release in held:
                release()


def _hold(store: Store) -> Any:
    """Open a transaction in ``store`` that its commits and rollbacks stay inside."""
    connection = store._connection
    if "commit" in connection.__dict__:
        raise MiddleStormError(
            "this store is already inside rolled_back(): blocks of it do not nest"
        )
    raw_execute = connection.raw_execute
    connection._ensure_connected()
    raw_execute(f"SAVEPOINT {SAVEPOINT}").close()  # opens the transaction first
    # What a real COMMIT or ROLLBACK ends and a savepoint's does not: SET LOCAL limits.
    reset = Timeouts().sql(reset_unset=True) if is_postgres(store) else ""

    def end_of_transaction() -> None:
        if reset:
            raw_execute(reset).close()

    def commit(xid: object = None) -> None:
        raw_execute(f"RELEASE SAVEPOINT {SAVEPOINT}").close()
        raw_execute(f"SAVEPOINT {SAVEPOINT}").close()
        end_of_transaction()
        trace("connection_commit", connection, xid)  # as a real one: the unit of work counts it

    def rollback(xid: object = None) -> None:
        raw_execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}").close()
        end_of_transaction()

    connection.commit = commit
    connection.rollback = rollback

    def release() -> None:
        del connection.commit, connection.rollback
        store.rollback()

    return release


@pytest.fixture
def storm_registry(request: pytest.FixtureRequest) -> StoreRegistry:
    """The registry of ``storm_app`` (define this fixture to test code outside WSGI)."""
    registry: StoreRegistry = request.getfixturevalue("storm_app").registry
    return registry


@pytest.fixture
def storm_rollback(storm_registry: StoreRegistry) -> Iterator[StoreRegistry]:
    """Roll back what the test's stores did, commits included."""
    with rolled_back(storm_registry) as registry:
        yield registry


class BufferedClient(Client):
    """A ``werkzeug.test.Client`` that reads and closes each response, as a server does,
    so that each request's transaction has ended when the call returns."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture
def storm_client(storm_app: Any, storm_rollback: StoreRegistry) -> BufferedClient:
    """A client of ``storm_app`` whose requests' work is rolled back after the test."""
    return BufferedClient(storm_app)
