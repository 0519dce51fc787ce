"""The example app: forms and a JSON API on the same notes, validated, on both databases."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from example_app import create_app
from example_app.app import MAX_BODY_BYTES
from example_app.flask_app import create_app as create_flask_app
from middlestorm.testing import BufferedClient
from tests.servers import REPO, free_port, request, start_server


@pytest.fixture
def client(empty_db):
    app = create_app(empty_db.uri)
    yield BufferedClient(app)
    app.registry.release()


@pytest.fixture
def storm_app(empty_db):
    """The app for middlestorm.testing's storm_client, whose work is rolled back."""
    app = create_app(empty_db.uri)
    yield app
    app.registry.release()


def test_notes_come_back_from_the_api_in_the_order_they_were_written(storm_client, empty_db):
    for body in ("first", "second", "third"):
        assert storm_client.post("/api/notes", json={"body": body}).status_code == 201

    assert [note["body"] for note in storm_client.get("/api/notes").json] == [
        "first",
        "second",
        "third",
    ]
    assert empty_db.notes() == []  # committed by each request, rolled back by the test


def test_a_deleted_note_is_gone_from_the_page_and_the_api(storm_client):
    url = storm_client.post("/api/notes", json={"body": "short-lived"}).headers["Location"]

    assert storm_client.delete(url).status_code == 204
    assert storm_client.get(url).status_code == 404
    assert "short-lived" not in storm_client.get("/").text


def test_the_form_adds_a_note_and_redirects_to_the_page(client, empty_db):
    response = client.post("/", data={"body": "  buy milk  "})

    assert (response.status_code, response.location) == (303, "/?done=added#note-1")
    assert empty_db.notes() == ["buy milk"]
    page = client.get(response.location).text
    assert "buy milk" in page and "Note added: committed before this page" in page


def test_the_page_says_what_middlestorm_did_for_it(client):
    page = client.get("/").text

    assert "in a read-only transaction, rolled back when the page is sent" in page


def test_the_page_is_styled_and_fits_a_phone(client):
    page = client.get("/").text
    stylesheet = client.get("/style.css")

    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert '<link rel="stylesheet" href="/style.css">' in page
    assert stylesheet.status_code == 200 and stylesheet.mimetype == "text/css"


def test_a_note_has_an_edit_page_and_a_delete_confirmation(client, empty_db):
    client.post("/", data={"body": "to be deleted"})

    edit = client.get("/notes/1")
    confirm = client.get("/notes/1/delete")

    assert edit.status_code == 200 and ">to be deleted</textarea>" in edit.text
    assert confirm.status_code == 200 and "Delete this note?" in confirm.text
    assert empty_db.notes() == ["to be deleted"]  # asking is not deleting
    assert client.post("/notes/1/delete").location == "/?done=deleted"
    assert empty_db.notes() == []


def test_a_refused_edit_shows_the_edit_page_with_the_error_and_what_was_typed(client, empty_db):
    client.post("/", data={"body": "original"})

    response = client.post("/notes/1", data={"body": "x" * 501})

    assert response.status_code == 400
    assert "body must be at most 500 characters" in response.text
    assert f">{'x' * 501}</textarea>" in response.text
    assert 'action="/notes/1"' in response.text
    assert "rolled back when the page is sent, as the form had a mistake" in response.text
    assert empty_db.notes() == ["original"]


def test_an_empty_form_is_refused_with_400_and_saves_nothing(client, empty_db):
    response = client.post("/", data={"body": "   "})

    assert response.status_code == 400
    assert "must not be empty" in response.text
    assert empty_db.notes() == []


def test_the_form_edits_and_deletes_a_note(client, empty_db):
    client.post("/", data={"body": "draft"})
    (note,) = client.get("/api/notes").json

    assert client.post(f"/notes/{note['id']}", data={"body": "final"}).status_code == 303
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
    "payload",
    [{"body": ""}, {"body": "x" * 501}, {"body": 7}, ["not", "an", "object"], None, 7, "text"],
)
def test_bad_json_is_refused_with_400_and_saves_nothing(client, empty_db, payload):
    response = client.post(
        "/api/notes", data=json.dumps(payload), content_type="application/json"
    )  # json=None would send no body at all

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


# -- bad input: a 4xx, never a 500, and nothing saved ------------------------------

FORM = "application/x-www-form-urlencoded"


def note_url(client, route: str) -> str:
    """``route`` with ``{id}`` filled in by a note created for the purpose."""
    created = client.post("/api/notes", json={"body": "keep me"})
    return route.format(id=created.json["id"])


WRITES = [  # every route that changes a note: (method, route, content type)
    ("POST", "/api/notes", "application/json"),
    ("PUT", "/api/notes/{id}", "application/json"),
    ("DELETE", "/api/notes/{id}", "application/json"),
    ("POST", "/", FORM),
    ("POST", "/notes/{id}", FORM),
    ("POST", "/notes/{id}/delete", FORM),
]
WRITES_WITH_A_BODY = [  # the routes that read the request body; the deletes do not
    ("POST", "/api/notes", "application/json"),
    ("PUT", "/api/notes/{id}", "application/json"),
    ("POST", "/", FORM),
    ("POST", "/notes/{id}", FORM),
]
MULTIPART = b'--b\r\nContent-Disposition: form-data; name="body"\r\n\r\nx\r\n--b--\r\n'


@pytest.mark.parametrize("note_id", [2**31, 2**63 - 1, 2**63, 99999999999999999999999])
@pytest.mark.parametrize(
    "method, route",
    [
        ("GET", "/api/notes/{id}"),
        ("PUT", "/api/notes/{id}"),
        ("DELETE", "/api/notes/{id}"),
        ("POST", "/notes/{id}"),
        ("POST", "/notes/{id}/delete"),
    ],
)
def test_an_id_beyond_what_the_database_holds_is_a_404(client, empty_db, method, route, note_id):
    client.post("/api/notes", json={"body": "keep me"})
    data = {"json": {"body": "x"}} if route.startswith("/api/") else {"data": {"body": "x"}}

    response = client.open(route.format(id=note_id), method=method, **data)

    assert response.status_code == 404
    assert empty_db.notes() == ["keep me"]


@pytest.mark.parametrize("note_id", ["abc", "1.5", "-1", "0", "+1", "1e0", "\u0661"])
@pytest.mark.parametrize(
    "method, route", [("GET", "/api/notes/{id}"), ("POST", "/notes/{id}/delete")]
)
def test_an_id_that_is_not_a_positive_whole_number_is_a_404(
    client, empty_db, method, route, note_id
):
    client.post("/api/notes", json={"body": "note 1"})

    response = client.open(route.format(id=note_id), method=method)

    assert response.status_code == 404  # "\u0661" is ARABIC-INDIC DIGIT ONE, not note 1
    assert empty_db.notes() == ["note 1"]


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\r"])
@pytest.mark.parametrize("via", ["json", "form"])
def test_control_characters_are_refused_with_a_400_naming_them(client, empty_db, via, char):
    body = f"before{char}after"
    if via == "json":
        response = client.post("/api/notes", json={"body": body})
    else:
        response = client.post("/", data={"body": body})

    assert response.status_code == 400
    assert f"control character U+{ord(char):04X}" in response.text
    assert empty_db.notes() == []


def test_a_lone_surrogate_in_json_is_refused_with_a_400(client, empty_db):
    response = client.post(
        "/api/notes", data=b'{"body": "a\\ud800b"}', content_type="application/json"
    )

    assert response.status_code == 400
    assert "U+D800" in response.json["error"]
    assert empty_db.notes() == []


@pytest.mark.parametrize("via", ["json", "form"])
def test_multi_line_notes_keep_their_newlines_and_tabs(client, empty_db, via):
    body = "shopping:\r\n\tmilk\n\teggs"  # a textarea sends CR LF
    if via == "json":
        response = client.post("/api/notes", json={"body": body})
    else:
        response = client.post("/", data={"body": body})

    assert response.status_code in (201, 303)
    assert empty_db.notes() == ["shopping:\n\tmilk\n\teggs"]


@pytest.mark.parametrize(
    "url, content_type, data",
    [
        ("/api/notes", "application/json", b'{"body": "caf\xe9"}'),  # Latin-1, not UTF-8
        ("/api/notes", "application/json", b'{"body": "\xc0\xaf"}'),  # an overlong "/"
        ("/", FORM, b"body=caf%E9"),
        ("/", FORM, b"body=caf\xe9"),
        ("/", FORM, b"body=%ED%A0%80"),  # an encoded surrogate
    ],
)
def test_invalid_utf8_is_refused_with_a_400(client, empty_db, url, content_type, data):
    response = client.post(url, data=data, content_type=content_type)

    assert response.status_code == 400
    assert "UTF-8" in response.text
    assert empty_db.notes() == []


@pytest.mark.parametrize(
    "data", [b"", b'{"body": ', b"{'body': 'x'}", b"[" * 50_000, b'{"body": 1' + b"0" * 5000 + b"}"]
)
def test_malformed_json_is_refused_with_a_400(client, empty_db, data):
    response = client.post("/api/notes", data=data, content_type="application/json")

    assert response.status_code == 400
    assert "JSON" in response.json["error"]
    assert empty_db.notes() == []


@pytest.mark.parametrize(
    "method, route, content_type, data",
    [
        ("POST", "/api/notes", "text/plain", b'{"body": "x"}'),
        ("POST", "/api/notes", FORM, b"body=x"),
        ("POST", "/api/notes", None, b'{"body": "x"}'),
        ("PUT", "/api/notes/{id}", "text/plain", b'{"body": "x"}'),
        ("POST", "/", "application/json", b'{"body": "x"}'),
        ("POST", "/", "multipart/form-data; boundary=b", MULTIPART),
        ("POST", "/notes/{id}", "text/plain", b"body=x"),
    ],
)
def test_a_body_of_the_wrong_content_type_is_refused_with_a_415(
    client, empty_db, method, route, content_type, data
):
    url = note_url(client, route)

    response = client.open(url, method=method, data=data, content_type=content_type)

    assert response.status_code == 415
    assert empty_db.notes() == ["keep me"]


@pytest.mark.parametrize(
    "url, content_type, data",
    [("/api/notes", "application/json", b'{"text": "x"}'), ("/", FORM, b"text=x")],
)
def test_a_missing_body_field_is_refused_with_a_400_saying_so(
    client, empty_db, url, content_type, data
):
    response = client.post(url, data=data, content_type=content_type)

    assert response.status_code == 400
    assert "body is missing" in response.text
    assert empty_db.notes() == []


# -- errors come in the format the client asked for --------------------------------

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_a_wrong_method_on_an_api_url_is_a_json_405_listing_the_allowed_ones(client):
    response = client.patch("/api/notes/1", json={"body": "x"})

    assert response.status_code == 405
    assert response.mimetype == "application/json" and response.json["error"]
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}


def test_an_unknown_api_url_is_a_json_404_even_for_a_browser(client):
    response = client.get("/api/nothing-here", headers={"Accept": BROWSER})

    assert response.status_code == 404
    assert response.mimetype == "application/json" and response.json["error"]


def test_a_browser_gets_html_errors_outside_the_api(client):
    response = client.get("/nothing-here", headers={"Accept": BROWSER})

    assert response.status_code == 404
    assert response.mimetype == "text/html"


@pytest.mark.parametrize(
    "method, url, data, status",
    [
        ("GET", "/nothing-here", None, 404),
        ("PATCH", "/notes/1", None, 405),
        ("POST", "/", {"body": ""}, 400),
        ("POST", "/notes/12345", {"body": "x"}, 404),
    ],
)
def test_a_client_preferring_json_gets_json_errors_everywhere(client, method, url, data, status):
    response = client.open(url, method=method, data=data, headers={"Accept": "application/json"})

    assert response.status_code == status
    assert response.mimetype == "application/json" and response.json["error"]


def test_an_unexpected_error_under_the_api_is_a_json_500(client, empty_db):
    empty_db.run("DROP TABLE note")

    response = client.get("/api/notes", headers={"Accept": BROWSER})

    assert response.status_code == 500
    assert response.mimetype == "application/json"
    assert "note" not in response.json["error"]  # the database's message stays in the log


def test_an_unexpected_error_on_the_page_is_an_html_500(client, empty_db):
    empty_db.run("DROP TABLE note")

    response = client.get("/", headers={"Accept": BROWSER})

    assert response.status_code == 500
    assert response.mimetype == "text/html"


# -- the request body limit --------------------------------------------------------


class GeneratedBody(io.RawIOBase):
    """A request body of ``size`` bytes, made as it is read; ``read_so_far`` counts them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.read_so_far = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.size - self.read_so_far)
        buffer[:count] = b"x" * count
        self.read_so_far += count
        return count


def huge_request(method: str, url: str, content_type: str, *, chunked: bool):
    """A request with a 300 MB body, sized by Content-Length or chunked, and its body."""
    body = GeneratedBody(300 * 1024 * 1024)
    environ = EnvironBuilder(url, method=method, content_type=content_type).get_environ()
    environ["wsgi.input"] = body
    if chunked:  # as servers present a chunked body: no length, terminated input
        environ.pop("CONTENT_LENGTH", None)
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(body.size)
    return Request(environ), body


@pytest.mark.parametrize("method, route, content_type", WRITES)
def test_a_body_over_the_limit_is_refused_with_a_413_and_nothing_saved(
    client, empty_db, method, route, content_type
):
    url = note_url(client, route)
    data = b"x" * (MAX_BODY_BYTES + 1)

    response = client.open(url, method=method, data=data, content_type=content_type)

    assert response.status_code == 413
    assert empty_db.notes() == ["keep me"]


def test_a_body_at_the_limit_is_read_and_judged_on_its_content(client, empty_db):
    data = b'{"body": "' + b"x" * (MAX_BODY_BYTES - 12) + b'"}'
    assert len(data) == MAX_BODY_BYTES

    response = client.post("/api/notes", data=data, content_type="application/json")

    assert response.status_code == 400
    assert "at most 500 characters" in response.json["error"]


@pytest.mark.parametrize("method, route, content_type", WRITES)
def test_a_body_declared_over_the_limit_is_refused_without_reading_it(
    client, empty_db, method, route, content_type
):
    oversized, body = huge_request(method, note_url(client, route), content_type, chunked=False)

    response = client.open(oversized)

    assert response.status_code == 413
    assert body.read_so_far == 0
    assert empty_db.notes() == ["keep me"]


@pytest.mark.parametrize("method, route, content_type", WRITES_WITH_A_BODY)
def test_a_chunked_body_over_the_limit_is_refused_once_it_passes_the_limit(
    client, empty_db, method, route, content_type
):
    oversized, body = huge_request(method, note_url(client, route), content_type, chunked=True)

    response = client.open(oversized)

    assert response.status_code == 413
    assert body.read_so_far <= MAX_BODY_BYTES + 64 * 1024  # at most one buffer past it
    assert empty_db.notes() == ["keep me"]


def send_the_start_of_a_huge_body(base_url: str, framing: str) -> bytes:
    """POST a 300 MB note, sending only its first bytes; the reply's head."""
    port = int(base_url.rsplit(":", 1)[1])
    if framing == "chunked":
        length = "Transfer-Encoding: chunked"
        chunk = b"x" * MAX_BODY_BYTES
        start = (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2  # and no last chunk
    else:
        length, start = f"Content-Length: {300 * 1024 * 1024}", b""
    head = (
        f"POST /api/notes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\n{length}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.encode() + start)
        reply = b""
        while b"\r\n\r\n" not in reply and (data := connection.recv(65536)):
            reply += data
    return reply


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_server_answers_413_before_a_huge_body_is_sent_and_serves_on(empty_db, tmp_path, framing):
    command = ["{python}", "-m", "example_app", "--port", "{port}", "--no-reload", "--production"]
    server = start_server(command, empty_db.uri, tmp_path / "server.log")
    try:
        reply = send_the_start_of_a_huge_body(server.base_url, framing)
        next_status, notes = request(server.base_url + "/api/notes")
    finally:
        server.stop()

    assert reply.split(b" ", 2)[1] == b"413", reply  # with 300 MB still to send
    assert (next_status, notes) == (200, [])
    assert empty_db.notes() == []


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


def test_the_paste_deploy_file_loads_the_app_behind_the_middlestorm_filter(tmp_path, monkeypatch):
    from paste.deploy import loadapp

    monkeypatch.chdir(tmp_path)  # its SQLite file is instance/notes.db under the current directory
    app = loadapp(f"config:{REPO / 'example_app' / 'deploy.ini'}")
    client = BufferedClient(app)

    assert client.post("/api/notes", json={"body": "via paste"}).status_code == 201
    assert client.post("/api/notes", json={"body": ""}).status_code == 400
    import sqlite3

    with sqlite3.connect(tmp_path / "instance" / "notes.db") as side_door:
        assert side_door.execute("SELECT body FROM note").fetchall() == [("via paste",)]


def test_a_flask_app_wrapped_through_wsgi_app_commits_and_aborts(empty_db):
    app = create_flask_app(empty_db.uri)
    client = app.test_client()

    assert client.post("/notes", data={"body": "from flask"}).status_code == 201
    assert client.post("/notes", data={"body": ""}).status_code == 400
    assert [note["body"] for note in client.get("/notes").json] == ["from flask"]
    assert empty_db.notes() == ["from flask"]
    app.wsgi_app.registry.release()


@pytest.fixture
def flask_client(empty_db):
    app = create_flask_app(empty_db.uri)
    yield app.test_client()
    app.wsgi_app.registry.release()


def test_the_flask_app_refuses_a_body_over_the_limit_with_a_json_413(flask_client, empty_db):
    response = flask_client.post("/notes", data=b"body=" + b"x" * MAX_BODY_BYTES, content_type=FORM)

    assert response.status_code == 413
    assert response.mimetype == "application/json" and response.json["error"]
    assert empty_db.notes() == []


@pytest.mark.parametrize(
    "method, url, status", [("GET", "/nothing-here", 404), ("DELETE", "/notes", 405)]
)
def test_the_flask_app_answers_errors_in_json(flask_client, method, url, status):
    response = flask_client.open(url, method=method)

    assert response.status_code == status
    assert response.mimetype == "application/json" and response.json["error"]


def test_the_flask_app_refuses_control_characters_with_a_json_400(flask_client, empty_db):
    response = flask_client.post("/notes", data={"body": "a\x00b"})

    assert response.status_code == 400
    assert "U+0000" in response.json["error"]
    assert empty_db.notes() == []


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
    assert result.stderr.startswith(
        "error: cannot connect to the database 'postgres://notes:***@127.0.0.1:1/notes'"
    )
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_a_bad_uri_gets_a_message_not_a_traceback():
    result = run_cli("--db", "postgresql+psycopg2://notes@localhost/notes", "--no-reload")

    assert result.returncode == 2
    assert "unknown database scheme 'postgresql+psycopg2'" in result.stderr
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


@pytest.mark.postgres
def test_concurrent_edits_of_one_note_all_succeed_on_postgres(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import make_database

    db = make_database("postgres", tmp_path, tables=False)
    app = create_app(db.uri)
    url = BufferedClient(app).post("/api/notes", json={"body": "draft"}).headers["Location"]

    def edit(number: int) -> list[int]:
        client = BufferedClient(app)
        statuses = [
            client.put(url, json={"body": f"edit {number}.{n}"}).status_code for n in range(10)
        ]
        app.registry.release()
        return statuses

    with ThreadPoolExecutor(6) as pool:
        statuses = [status for each in pool.map(edit, range(6)) for status in each]
    app.registry.release()

    assert statuses == [200] * 60  # conflicting edits were run again, never a 500
    assert db.notes()[0].startswith("edit ")


def test_the_flask_app_lets_a_transient_failure_through_to_be_run_again(empty_db):
    from transaction.interfaces import TransientError

    app = create_flask_app(empty_db.uri)
    attempts = []

    def conflicting_once():
        attempts.append(1)
        if len(attempts) == 1:
            raise TransientError("a conflict")
        return {"attempts": len(attempts)}

    app.add_url_rule("/conflict", view_func=conflicting_once)

    response = app.test_client().get("/conflict")
    app.wsgi_app.registry.release()

    assert (response.status_code, response.json) == (200, {"attempts": 2})


def test_a_chunked_body_of_exactly_the_limit_is_read(client, empty_db):
    body = b'{"body": "' + b"x" * (MAX_BODY_BYTES - 12) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    environ = EnvironBuilder("/api/notes", method="POST", content_type="application/json")
    environ = environ.get_environ()
    environ.pop("CONTENT_LENGTH", None)  # as servers present a chunked body
    environ.update(
        {"wsgi.input": io.BytesIO(body), "HTTP_TRANSFER_ENCODING": "chunked"},
        **{"wsgi.input_terminated": True},
    )

    response = client.open(Request(environ))

    assert response.status_code == 400  # read and judged on its content: too long a note
    assert "at most 500 characters" in response.json["error"]
