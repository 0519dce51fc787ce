"""The example app: forms and a JSON API on the same notes, validated, on both databases."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request

import pytest
from werkzeug.test import Client

from example_app import create_app
from example_app.flask_app import create_app as create_flask_app
from tests.servers import REPO, free_port, start_server


class BufferedClient(Client):
    """Reads and closes each response body, as a server does."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture
def client(empty_db):
    app = create_app(empty_db.uri)
    yield BufferedClient(app)
    app.registry.release()


def test_the_form_adds_a_note_and_redirects_to_the_page(client, empty_db):
    response = client.post("/", data={"body": "  buy milk  "})

    assert (response.status_code, response.location) == (303, "/")
    assert empty_db.notes() == ["buy milk"]
    assert "buy milk" in client.get("/").text


def test_an_empty_form_is_refused_with_400_and_saves_nothing(client, empty_db):
    response = client.post("/", data={"body": "   "})

    assert response.status_code == 400
    assert "must not be empty" in response.text
    assert empty_db.notes() == []


def test_the_form_edits_and_deletes_a_note(client, empty_db):
    client.post("/", data={"body": "draft"})
    (note,) = client.get("/api/notes").json

    client.post(f"/notes/{note['id']}", data={"body": "final"})
    assert empty_db.notes() == ["final"]
    client.post(f"/notes/{note['id']}/delete")
    assert empty_db.notes() == []


def test_the_json_api_creates_reads_updates_and_deletes(client, empty_db):
    created = client.post("/api/notes", json={"body": "hello"})
    assert created.status_code == 201
    url = created.headers["Location"]

    assert client.get(url).json["body"] == "hello"
    updated = client.put(url, json={"body": "hello again"})
    assert updated.json["body"] == "hello again" and updated.json["updated"]
    assert empty_db.notes() == ["hello again"]
    assert client.delete(url).status_code == 204
    assert client.get(url).status_code == 404
    assert empty_db.notes() == []


@pytest.mark.parametrize(
    "payload", [{"body": ""}, {"body": "x" * 501}, {"body": 7}, ["not", "an", "object"], None]
)
def test_bad_json_is_refused_with_400_and_saves_nothing(client, empty_db, payload):
    response = client.post("/api/notes", json=payload)

    assert response.status_code == 400
    assert "error" in response.json
    assert empty_db.notes() == []


def test_an_invalid_update_changes_nothing(client, empty_db):
    url = client.post("/api/notes", json={"body": "keep me"}).headers["Location"]

    assert client.put(url, json={"body": ""}).status_code == 400
    assert empty_db.notes() == ["keep me"]


def test_a_missing_note_is_a_json_404(client):
    response = client.get("/api/notes/12345")

    assert response.status_code == 404
    assert "no note 12345" in response.json["error"]


def test_the_schema_is_made_by_storm_schema_with_its_patches_marked_applied(client, empty_db):
    assert empty_db.query("SELECT version FROM patch ORDER BY version") == [(1,)]


def test_an_old_database_is_upgraded_by_its_patches(empty_db):
    empty_db.run(
        "CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT NOT NULL,"
        " created TIMESTAMP NOT NULL)",
        "CREATE TABLE patch (version INTEGER NOT NULL PRIMARY KEY)",
        "INSERT INTO note VALUES (1, 'from before', '2020-01-01 00:00:00')",
    )

    app = create_app(empty_db.uri)
    try:
        response = BufferedClient(app).put("/api/notes/1", json={"body": "edited"})
    finally:
        app.registry.release()

    assert response.status_code == 200 and response.json["updated"]
    assert empty_db.query("SELECT version FROM patch ORDER BY version") == [(1,)]


def test_the_paste_deploy_file_loads_the_app_behind_the_middlestorm_filter(tmp_path):
    from paste.deploy import loadapp

    shutil.copy(REPO / "example_app" / "deploy.ini", tmp_path / "deploy.ini")
    app = loadapp(f"config:{tmp_path / 'deploy.ini'}")
    client = BufferedClient(app)

    assert client.post("/api/notes", json={"body": "via paste"}).status_code == 201
    assert client.post("/api/notes", json={"body": ""}).status_code == 400
    import sqlite3

    with sqlite3.connect(tmp_path / "notes.db") as side_door:
        assert side_door.execute("SELECT body FROM note").fetchall() == [("via paste",)]


def test_a_flask_app_wrapped_through_wsgi_app_commits_and_aborts(empty_db):
    app = create_flask_app(empty_db.uri)
    client = app.test_client()

    assert client.post("/notes", data={"body": "from flask"}).status_code == 201
    assert client.post("/notes", data={"body": ""}).status_code == 400
    assert [note["body"] for note in client.get("/notes").json] == ["from flask"]
    assert empty_db.notes() == ["from flask"]
    app.wsgi_app.registry.release()


def run_cli(*arguments: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "example_app", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_the_command_line_explains_its_options():
    result = run_cli("--help")

    assert result.returncode == 0
    for option in ("--db URI", "EXAMPLE_APP_DB", "--port", "--no-reload", "instance/notes.db"):
        assert option in result.stdout


def test_an_unreachable_database_gets_a_message_not_a_traceback():
    result = run_cli("--db", "postgres://notes:hunter2@127.0.0.1:1/notes", "--no-reload")

    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the database postgres://notes:***@")
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_a_bad_uri_gets_a_message_not_a_traceback():
    result = run_cli("--db", "postgresql://notes@localhost/notes", "--no-reload")

    assert result.returncode == 2
    assert "unknown database scheme 'postgresql'" in result.stderr
    assert "Traceback" not in result.stderr


def server_timing_of(base_url: str) -> str | None:
    with urllib.request.urlopen(base_url + "/api/notes", timeout=30) as response:
        return response.headers.get("Server-Timing")


def test_with_no_database_given_it_serves_an_sqlite_file_it_creates(tmp_path):
    shutil.copytree(REPO / "example_app", tmp_path / "example_app")
    command = ["{python}", "-m", "example_app", "--port", "{port}", "--no-reload"]
    server = start_server(command, "", tmp_path / "server.log", cwd=tmp_path, port=free_port())
    try:
        timing = server_timing_of(server.base_url)
    finally:
        server.stop()

    assert (tmp_path / "instance" / "notes.db").is_file()
    assert timing and timing.startswith("db;dur=")  # development mode shows it
    assert "DEBUG middlestorm.timing: GET /api/notes -> 200 OK, committed" in server.output


def test_production_mode_sends_no_server_timing(empty_db, tmp_path):
    command = ["{python}", "-m", "example_app", "--port", "{port}", "--no-reload", "--production"]
    server = start_server(command, empty_db.uri, tmp_path / "server.log")
    try:
        assert server_timing_of(server.base_url) is None
    finally:
        server.stop()
    assert "middlestorm.timing" not in server.output


def test_processes_starting_together_create_the_schema_once(empty_db):
    script = (
        "import sys; from example_app.schema import upgrade_database; upgrade_database(sys.argv[1])"
    )
    starting = [
        subprocess.Popen(
            [sys.executable, "-c", script, empty_db.uri],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [process.communicate(timeout=60)[1] for process in starting]

    assert [process.returncode for process in starting] == [0] * 4, errors
    assert empty_db.query("SELECT version FROM patch") == [(1,)]
