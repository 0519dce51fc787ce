"""A WSGI application the tests serve with real servers, as ``tests.wsgi_apps:app``.

The database comes from ``$EXAMPLE_APP_DB`` (the tests' ``note`` and ``tag``
tables); the file to download from ``$DOWNLOAD_FILE``. Routes:

``/api/notes``
    200 with ``[]``: the servers' readiness check.
``/stream-failing-commit``, ``/sized-failing-commit``
    a streamed body (unsized, or with a Content-Length over the buffer limit)
    whose COMMIT fails on a deferred foreign key.
``/stream-committed``
    the same body whose COMMIT succeeds.
``/hop-by-hop``
    a streamed body that writes a note, with a ``Keep-Alive`` header, which
    waitress refuses in ``start_response`` (PEP 3333 forbids hop-by-hop headers).
``/download``, ``/download-bare``
    the file, through the server's ``wsgi.file_wrapper``, with and without
    a note written in the request's transaction.
"""

from __future__ import annotations

import os

from middlestorm import MiddleStorm
from tests.models import Note, Tag

CHUNKS = [b"first chunk\n", b"second chunk\n", b"last chunk\n"]
BUFFER_LIMIT = 16


def routes(environ, start_response):
    path = environ["PATH_INFO"]
    if path in ("/stream-failing-commit", "/sized-failing-commit", "/stream-committed"):
        return stream(environ, start_response, path)
    if path == "/hop-by-hop":
        environ["storm.store"].add(Note(path))
        environ["storm.store"].flush()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Keep-Alive", "timeout=5")])
        return iter(CHUNKS)
    if path.startswith("/download"):
        return download(environ, start_response, write=path == "/download")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b"[]"]


def stream(environ, start_response, path):
    store = environ["storm.store"]
    headers = [("Content-Type", "text/plain")]
    if path == "/sized-failing-commit":
        headers.append(("Content-Length", str(sum(map(len, CHUNKS)))))
    start_response("200 OK", headers)

    def body():
        store.add(Note(path))
        if path != "/stream-committed":
            store.add(Tag(note_id=999_999))  # a dangling foreign key: the COMMIT fails
        yield from CHUNKS

    return body()


def download(environ, start_response, *, write: bool):
    if write:
        environ["storm.store"].add(Note("downloaded"))
    path = os.environ["DOWNLOAD_FILE"]
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", str(os.path.getsize(path))),
    ]
    start_response("200 OK", headers)
    return environ["wsgi.file_wrapper"](open(path, "rb"), 1024 * 1024)


def __getattr__(name: str) -> MiddleStorm:
    """``app`` is made when a server asks for it, so the tests can import this module."""
    if name != "app":
        raise AttributeError(name)
    return MiddleStorm(routes, os.environ["EXAMPLE_APP_DB"], buffer_limit=BUFFER_LIMIT)
