"""The app the fault tests and the soak serve with real servers, as ``tests.fault_app:app``,
and an HTTP client that sees what a user's client sees.

The database comes from ``$EXAMPLE_APP_DB`` (the tests' ``note`` and
``counter`` tables, ``tests.conftest.SCHEMA``); the default retry policy is
in force. Every response carries ``X-Attempt`` (``environ["middlestorm.attempt"]``)
and, when the request used the database, ``X-Session``, the PostgreSQL
session that served it (backend pid and start time: unique, unlike a pid).
Retries are logged at INFO on ``middlestorm.work`` to the server's output.

``GET /api/notes``
    200 ``[]`` without touching the database: the servers' readiness check.
``POST /increment?counter=N``
    adds 1 to counter N: concurrent increments conflict.
``POST /notes``
    saves the JSON body's ``body`` as a note (201); 400 for a missing one.
``GET /notes/count``
    how many notes there are.
``GET /session?hold=S``
    the serving session, after holding the request S seconds.
``POST /upload?conflict=1``
    reads the body as a form, JSON or raw bytes (by Content-Type), saves a
    note naming its kind, length and SHA-256, and answers them. With
    ``conflict=1`` the first attempt then meets a real serialization failure
    (another session increments counter 1 under its snapshot), so the
    request runs again and must read the same body again.
``GET /stream?tag=T&chunks=N``
    saves note ``stream T``, then streams N chunks of 16 KiB, 10 ms apart,
    without a Content-Length: the note is committed only if the body runs out.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from werkzeug.exceptions import BadRequest, HTTPException, NotFound
from werkzeug.wrappers import Request, Response

from middlestorm import MiddleStorm, current_store
from tests.models import Counter, Note

CHUNK = b"x" * 16 * 1024


def session_id() -> str:
    row = current_store.execute(
        "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    ).get_one()
    return f"{row[0]}@{row[1].isoformat()}"


@Request.application
def routes(request: Request) -> Response:
    try:
        response = dispatch(request)
    except HTTPException as error:
        response = error.get_response(request.environ)
    response.headers["X-Attempt"] = str(request.environ["middlestorm.attempt"])
    return response


def dispatch(request: Request) -> Response:
    path, method = request.path, request.method
    if path == "/api/notes":
        return json_response([])
    if (path, method) == ("/increment", "POST"):
        counter = current_store.get(Counter, int(request.args.get("counter", "1")))
        if counter is None:
            raise NotFound("no such counter")
        counter.value += 1
        current_store.flush()
        return json_response({"value": counter.value}, session=session_id())
    if (path, method) == ("/notes", "POST"):
        body = (request.get_json(silent=True) or {}).get("body")
        if not isinstance(body, str) or not body:
            raise BadRequest("send {'body': text}")
        current_store.add(Note(body))
        current_store.flush()
        return json_response({"body": body}, 201, session=session_id())
    if (path, method) == ("/notes/count", "GET"):
        count = current_store.execute("SELECT count(*) FROM note").get_one()[0]
        return json_response({"count": count}, session=session_id())
    if (path, method) == ("/session", "GET"):
        session = session_id()
        time.sleep(float(request.args.get("hold", "0")))
        return json_response({"session": session}, session=session)
    if (path, method) == ("/upload", "POST"):
        return upload(request)
    if (path, method) == ("/stream", "GET"):
        return stream(request)
    raise NotFound()


def upload(request: Request) -> Response:
    if request.mimetype == "application/x-www-form-urlencoded":
        kind, data = "form", json.dumps(request.form.to_dict(flat=False), sort_keys=True).encode()
    elif request.is_json:
        kind, data = "json", json.dumps(request.get_json(), sort_keys=True).encode()
    else:
        kind, data = "raw", request.get_data()
    digest = hashlib.sha256(data).hexdigest()
    current_store.add(Note(f"upload {kind} {len(data)} {digest}"))
    counter = current_store.get(Counter, 1)  # the snapshot is taken here
    if request.args.get("conflict") and request.environ["middlestorm.attempt"] == 1:
        increment_elsewhere(1)
    counter.value += 1
    current_store.flush()  # a serialization failure in the first attempt
    return json_response({"kind": kind, "length": len(data), "sha256": digest}, 201)


def increment_elsewhere(counter: int) -> None:
    """Another session increments ``counter`` and commits, under this one's snapshot."""
    import psycopg2

    uri = os.environ["EXAMPLE_APP_DB"].replace("postgres://", "postgresql://", 1)
    connection = psycopg2.connect(uri.split("?", 1)[0], application_name="fault-app-side-door")
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("UPDATE counter SET value = value + 1 WHERE id = %s", (counter,))
    finally:
        connection.close()


def stream(request: Request) -> Response:
    current_store.add(Note(f"stream {request.args['tag']}"))
    current_store.flush()
    chunks = int(request.args.get("chunks", "100"))

    def body():
        for _ in range(chunks):
            yield CHUNK
            time.sleep(0.01)

    return Response(body(), content_type="application/octet-stream")


def json_response(data, status: int = 200, *, session: str | None = None) -> Response:
    response = Response(json.dumps(data), status, content_type="application/json")
    if session is not None:
        response.headers["X-Session"] = session
    return response


def _log_retries() -> None:
    work = logging.getLogger("middlestorm.work")
    if not work.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        work.addHandler(handler)
        work.setLevel(logging.INFO)
        work.propagate = False


def __getattr__(name: str) -> MiddleStorm:
    """``app`` is made when a server asks for it, so the tests can import this module."""
    if name != "app":
        raise AttributeError(name)
    _log_retries()
    return MiddleStorm(routes, os.environ["EXAMPLE_APP_DB"])


# -- the client side ------------------------------------------------------------------


@dataclass
class Reply:
    """What a client got: no status when the connection failed or was cut."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def attempt(self) -> int:
        return int(self.headers.get("x-attempt", "0"))

    @property
    def session(self) -> str | None:
        return self.headers.get("x-session")

    def json(self):
        return json.loads(self.body)


def call(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    """One request on a connection of its own, as a browser or API client sends it."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=timeout
    )
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, target, body, headers or {})
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    except (http.client.HTTPException, OSError) as error:
        return Reply(None, error=f"{type(error).__name__}: {error}")
    finally:
        connection.close()


def post_json(url: str, data) -> Reply:
    return call(url, "POST", json.dumps(data).encode(), {"Content-Type": "application/json"})
