"""fork(): a child starts clean even when its parent was mid-transaction.

The parent is "mid-request": its store has joined the transaction and talked
to the database. On SQLite it runs ``SELECT 1``, which opens Storm's
transaction without locking the file, so that the child can still write.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import transaction
from storm.exceptions import ClosedError
from storm.store import Store

from middlestorm import StoreRegistry
from tests.helpers import in_forked_child
from tests.models import Note
from tests.servers import request, start_server

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


@pytest.fixture
def registry(db) -> Iterator[StoreRegistry]:
    made = StoreRegistry({"main": db.uri})
    yield made
    transaction.abort()
    made.release()


def mid_request(store: Store, body: str | None = None) -> None:
    """Join ``store`` to this thread's transaction and use its connection, as a request would."""
    store.execute("SELECT 1")
    if body is not None:
        store.add(Note(body))


def test_a_child_forked_mid_request_and_its_parent_each_commit_their_write(db, registry):
    mid_request(registry.get(), "from the parent")

    def child() -> list[str]:
        transaction.begin()
        registry.get().add(Note("from the child"))
        transaction.commit()
        return db.notes()

    assert in_forked_child(child) == ["from the child"]
    transaction.commit()
    assert sorted(db.notes()) == ["from the child", "from the parent"]


def test_a_child_forked_mid_request_has_no_transaction_under_way(registry):
    mid_request(registry.get(), "from the parent")
    inherited = transaction.get()

    def child() -> bool:
        return transaction.get() is inherited

    assert in_forked_child(child) is False
    assert transaction.get() is inherited


def test_a_child_forked_mid_request_uses_a_connection_of_its_own(pg):
    registry = StoreRegistry({"main": pg.uri})
    store = registry.get()
    session = "SELECT pg_backend_pid(), txid_current()"
    parent_session = store.execute(session).get_one()

    def child() -> int:
        transaction.begin()
        backend = registry.get().execute("SELECT pg_backend_pid()").get_one()[0]
        transaction.commit()
        return backend

    try:
        assert in_forked_child(child) != parent_session[0]
        # The same backend, still in the same transaction.
        assert store.execute(session).get_one() == parent_session
    finally:
        transaction.abort()
        registry.release()


def test_a_child_forked_mid_request_can_begin_with_an_explicit_manager(db):
    manager = transaction.ThreadTransactionManager()
    manager.explicit = True
    registry = StoreRegistry({"main": db.uri}, transaction_manager=manager)
    manager.begin()
    mid_request(registry.get(), "from the parent")

    def child() -> list[str]:
        manager.begin()
        registry.get().add(Note("from the child"))
        manager.commit()
        return db.notes()

    try:
        assert in_forked_child(child) == ["from the child"]
        manager.commit()
    finally:
        registry.release()
    assert sorted(db.notes()) == ["from the child", "from the parent"]


def test_a_child_forked_mid_request_starts_clean_when_two_registries_share_a_manager(db):
    notes = StoreRegistry({"notes": db.uri})
    reports = StoreRegistry({"reports": db.uri})
    mid_request(notes.get(), "from the parent")
    mid_request(reports.get())

    def child() -> list[str]:
        transaction.begin()
        notes.get().add(Note("from the child"))
        reports.get().execute("SELECT 1")
        transaction.commit()
        return db.notes()

    try:
        assert in_forked_child(child) == ["from the child"]
        transaction.commit()
    finally:
        transaction.abort()
        notes.release()
        reports.release()
    assert sorted(db.notes()) == ["from the child", "from the parent"]


def test_a_store_inherited_across_fork_can_be_rolled_back_and_closed_but_not_used(registry):
    inherited = registry.get()
    mid_request(inherited)

    def child() -> str:
        inherited.rollback()
        inherited.close()
        with pytest.raises(ClosedError):
            inherited.find(Note).count()
        return "refused"

    assert in_forked_child(child) == "refused"


def _write_from_a_multiprocessing_child(registry: StoreRegistry, pipe) -> None:
    try:
        transaction.begin()
        registry.get().add(Note("from the child"))
        transaction.commit()
        pipe.send("committed")
    except BaseException:
        pipe.send(traceback.format_exc())


def test_a_multiprocessing_child_forked_mid_transaction_commits_its_write(db, registry):
    mid_request(registry.get(), "from the parent")
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)

    child = context.Process(target=_write_from_a_multiprocessing_child, args=(registry, sending))
    child.start()
    child.join(30)

    assert child.exitcode == 0
    assert receiving.poll(5) and receiving.recv() == "committed"
    transaction.commit()
    assert sorted(db.notes()) == ["from the child", "from the parent"]


PRELOADED_APP = '''
"""Reads at import time and never commits, then serves GET with MiddleStorm."""
import json
import os
import time

from middlestorm import MiddleStorm, StoreRegistry

registry = StoreRegistry({"main": os.environ["EXAMPLE_APP_DB"]})
registry.get().execute("SELECT count(*) FROM note").get_one()  # left open

served = {"requests": 0, "failures": 0}


def notes(environ, start_response):
    time.sleep(0.02)  # keep a worker busy, so that both take requests
    count = environ["storm.store"].execute("SELECT count(*) FROM note").get_one()[0]
    body = json.dumps({"pid": os.getpid(), "notes": count, **served}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


middleware = MiddleStorm(notes, registry)


def app(environ, start_response):
    served["requests"] += 1
    try:
        return middleware(environ, start_response)
    except Exception:
        served["failures"] += 1
        raise
'''


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_gunicorn_preload_sync_worker_answers_its_first_request(db, tmp_path: Path):
    (tmp_path / "preloaded_app.py").write_text(PRELOADED_APP)
    command = [
        "{python}", "-m", "gunicorn", "-k", "sync", "-w", "2", "--preload",
        "-b", "127.0.0.1:{port}", "preloaded_app:app",
    ]  # fmt: skip
    server = start_server(command, db.uri, tmp_path / "server.log", cwd=tmp_path)
    try:
        answers: list[tuple[int | None, object]] = []
        lock = threading.Lock()

        def client() -> None:
            for _ in range(5):
                answer = request(server.base_url + "/api/notes")
                with lock:
                    answers.append(answer)

        for _ in range(10):  # until both workers have answered
            with ThreadPoolExecutor(4) as pool:
                for outcome in [pool.submit(client) for _ in range(4)]:
                    outcome.result()
            if len({body["pid"] for _, body in answers if isinstance(body, dict)}) == 2:
                break
        output = server.output
    finally:
        server.stop()

    assert [status for status, _ in answers] == [200] * len(answers)
    bodies = [body for _, body in answers]
    assert all(isinstance(body, dict) and body["failures"] == 0 for body in bodies), bodies
    assert len({body["pid"] for body in bodies}) == 2  # type: ignore[index]
    assert "Traceback" not in output, output
