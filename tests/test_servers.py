"""The example app under real servers, each in its own process, over real sockets.

Every server runs the same scenario: concurrent clients write notes (some
invalid) and read them back; afterwards every write that got a 2xx is in the
database and no refused one is.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.servers import REPO, exercise, start_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

THREAD_ERRORS = ("created in a thread", "WrongThreadError", "registered with another thread")


def check_output(output: str) -> None:
    for error in THREAD_ERRORS:
        assert error not in output, output
    assert "Traceback" not in output, output


SERVERS = {
    "gunicorn gthread": [
        "{python}", "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "2",
        "-b", "127.0.0.1:{port}", "example_app.wsgi:app",
    ],
    "gunicorn gthread --preload": [
        "{python}", "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "2",
        "--preload", "-b", "127.0.0.1:{port}", "example_app.wsgi:app",
    ],
    # Sync workers serve requests in the thread that imported the app before
    # the fork: without fork safety they would share the master's connection.
    "gunicorn sync --preload": [
        "{python}", "-m", "gunicorn", "-k", "sync", "-w", "3", "--preload",
        "-b", "127.0.0.1:{port}", "example_app.wsgi:app",
    ],
    "waitress": [
        "{python}", "-m", "waitress", "--listen", "127.0.0.1:{port}", "--threads", "4",
        "example_app.wsgi:app",
    ],
    "twisted WSGIResource": [
        "{python}", "-m", "twisted", "web", "--listen", "tcp:{port}:interface=127.0.0.1",
        "--wsgi", "example_app.wsgi.app",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", SERVERS)
def test_a_production_server_keeps_every_acknowledged_write(name, empty_db, tmp_path):
    server = start_server(SERVERS[name], empty_db.uri, tmp_path / "server.log")
    try:
        score = exercise(server.base_url, clients=4, writes=12)
    finally:
        server.stop()

    assert not score.unanswered and not score.read_failures, server.output
    assert len(score.saved) == 4 * 9 and len(score.refused) == 4 * 3
    score.check_against(empty_db.notes())
    check_output(server.output)


def test_the_dev_server_keeps_serving_through_a_reload(empty_db, tmp_path):
    app_copy = tmp_path / "example_app"
    shutil.copytree(REPO / "example_app", app_copy, ignore=shutil.ignore_patterns("__pycache__"))
    command = ["{python}", "-m", "example_app", "--db", empty_db.uri, "--port", "{port}"]
    server = start_server(command, empty_db.uri, tmp_path / "server.log", cwd=tmp_path)

    def reload_midway(score) -> None:
        deadline = time.monotonic() + 30
        while len(score.saved) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        later = time.time() + 5
        os.utime(app_copy / "models.py", (later, later))
        while server.output.count("Restarting with") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        score = exercise(server.base_url, clients=4, writes=30, during=reload_midway)
        after_reload = exercise(server.base_url, clients=2, writes=4, prefix="after")
    finally:
        server.stop()

    assert server.output.count("Restarting with") == 2, server.output  # start, then reload
    assert "models.py" in server.output
    assert len(after_reload.saved) == 2 * 3 and not after_reload.unanswered
    assert len(score.unanswered) <= 4, score.unanswered  # at most the requests cut by the reload
    score.check_against([n for n in empty_db.notes() if n not in after_reload.saved])
    for error in THREAD_ERRORS:
        assert error not in server.output, server.output
