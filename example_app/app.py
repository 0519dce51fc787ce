"""Routes and views: an HTML page with forms, and a JSON API for the same notes.

Bad input gets a 4xx and changes nothing: a form's mistake a 400 showing the
page again with the reason; malformed JSON, text that is not UTF-8 or that
holds control characters (newline and tab are fine) a 400; a body of the wrong
Content-Type a 415; an id that is not a whole number from 1 to ``MAX_ID`` a
404; a request body over ``MAX_BODY_BYTES`` a 413, before it is read.

Errors come as JSON, ``{"error": "..."}``, under ``/api/`` and to any client
whose Accept header prefers ``application/json`` to ``text/html``; otherwise
as HTML. That holds for the app's own errors (400, 404, 405, 413, 415) and
for an unexpected one (500, its traceback logged, not sent). A transient
database failure (two edits of one note at once) is not an error of the app's:
it propagates, and middlestorm runs the request again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    InternalServerError,
    NotFound,
    RequestEntityTooLarge,
    UnsupportedMediaType,
)
from werkzeug.routing import IntegerConverter, Map, Rule
from werkzeug.utils import redirect
from werkzeug.wrappers import Request, Response

from example_app import config, pages, schema
from example_app.models import FORBIDDEN, Note, validate_body
from middlestorm import MiddleStorm, current_store
from middlestorm.retry import RetryPolicy, Verdict, classify
from middlestorm.routes import read_only
from middlestorm.work import Next, attempts

#: The page's stylesheet, served at /style.css.
STYLESHEET = (Path(__file__).parent / "static" / "style.css").read_text()
#: The largest request body read, in bytes; a larger one is refused with 413.
#: Far above what a note needs: 500 characters are at most 6 KB of JSON.
MAX_BODY_BYTES = 64 * 1024
#: The largest note id looked up. SQLite's INTEGER holds 64 bits; PostgreSQL's
#: SERIAL stops at 2**31 - 1 but compares a larger number to it without error.
#: So ids up to here are looked up on both, and any beyond is a 404 without a query.
MAX_ID = 2**63 - 1
#: The one form encoding the page's forms send.
FORM = "application/x-www-form-urlencoded"

log = logging.getLogger(__name__)


def create_app(
    db_uri: str, *, server_timing: bool = False, wait_for_database: float = 0
) -> MiddleStorm:
    """The notes application on the database at ``db_uri``, wrapped in MiddleStorm.

    The schema is created or upgraded first, with this thread's store. With
    ``wait_for_database`` seconds, a database that cannot be reached (it is
    restarting while a server starts a worker) is waited for, as requests
    wait: retried with backoff, then the error is raised.
    """
    app = MiddleStorm(notes_app, db_uri, server_timing=server_timing)
    if wait_for_database:
        patience = RetryPolicy(
            attempts=1000, backoff=0.1, max_backoff=1.0, deadline=wait_for_database
        )
        for attempt in attempts(patience):
            try:
                schema.upgrade(app.registry.get())
                break
            except Exception as error:
                app.registry.transaction_manager.abort()
                if attempt.failed(error, "schema upgrade") is not Next.RETRY:
                    raise
    else:
        schema.upgrade(app.registry.get())
    app.registry.transaction_manager.commit()
    return app


def paste_app_factory(global_conf: dict[str, str], **local_conf: str) -> Callable:
    """The bare notes app for Paste Deploy, where middlestorm is a filter (deploy.ini)."""
    schema.upgrade_database(config.prepare(global_conf["db_uri"]))
    return notes_app


class NotesRequest(Request):
    #: werkzeug stops reading a chunked body at this size: one byte past the
    #: limit tells a body over it from one of exactly the limit. (notes_app
    #: refuses a Content-Length over the limit itself.)
    max_content_length = MAX_BODY_BYTES + 1


@NotesRequest.application
def notes_app(request: Request) -> Response:
    try:
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise body_too_large()  # even where the view would not read it
        view, values = URLS.bind_to_environ(request.environ).match()
        response = view(request, **values)
        current_store.flush()  # a database error is then still this app's to report
        return response
    except HTTPException as error:
        return error_response(request, error)
    except Exception as error:
        if classify(error) is not Verdict.PERMANENT:
            raise  # transient, or a commit in doubt: middlestorm runs the request again
        log.exception("%s %s failed", request.method, request.path)
        return error_response(request, InternalServerError())


def wants_json(request: Request) -> bool:
    """Whether errors go out as JSON: under /api/, or when the client prefers it."""
    if request.path == "/api" or request.path.startswith("/api/"):
        return True
    preferred = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return preferred == "application/json"


def error_response(request: Request, error: HTTPException) -> Response:
    if wants_json(request):
        headers = [  # such as a 405's Allow
            (name, value)
            for name, value in error.get_headers(request.environ)
            if name.lower() != "content-type"
        ]
        return json_response({"error": error.description}, error.code or 500, headers)
    if error.code == 400 and request.method == "POST":  # a form's mistake
        return form_error_page(request, error.description or "the form was refused")
    return error.get_response(request.environ)


# -- the HTML pages -----------------------------------------------------------------


@read_only
def page(request: Request) -> Response:
    notes = list(current_store.find(Note).order_by(Note.id))
    return html_response(pages.notes_page(notes, done=request.args.get("done")))


@read_only
def page_edit(request: Request, note_id: int) -> Response:
    return html_response(pages.edit_page(get_note(note_id)))


@read_only
def page_confirm_delete(request: Request, note_id: int) -> Response:
    return html_response(pages.delete_page(get_note(note_id)))


def page_create(request: Request) -> Response:
    note = current_store.add(Note(body_from_form(request)))
    current_store.flush()  # assigns note.id
    return redirect(f"/?done=added#note-{note.id}", 303)


def page_update(request: Request, note_id: int) -> Response:
    note = get_note(note_id)
    edit(note, body_from_form(request))
    return redirect(f"/?done=saved#note-{note.id}", 303)


def page_delete(request: Request, note_id: int) -> Response:
    current_store.remove(get_note(note_id))
    return redirect("/?done=deleted", 303)


def form_error_page(request: Request, error: str) -> Response:
    """The page the refused form was on, saying why, with what was typed in it."""
    draft = form_draft(request)
    view, values = URLS.bind_to_environ(request.environ).match(method="POST")
    note = current_store.get(Note, values["note_id"]) if view is page_update else None
    if note is not None:
        return html_response(pages.edit_page(note, error=error, draft=draft), 400)
    notes = list(current_store.find(Note).order_by(Note.id))
    return html_response(pages.notes_page(notes, error=error, draft=draft), 400)


def form_draft(request: Request) -> str:
    """The ``body`` field of a refused form, as far as it can be read."""
    fields = parse_qs(request.get_data().decode(errors="replace"), keep_blank_values=True)
    return FORBIDDEN.sub("", fields.get("body", [""])[0])


def stylesheet(request: Request) -> Response:
    response = Response(STYLESHEET, content_type="text/css; charset=utf-8")
    response.cache_control.max_age = 3600
    return response


def html_response(body: str, status: int = 200) -> Response:
    return Response(body, status, content_type="text/html; charset=utf-8")


# -- the JSON API -------------------------------------------------------------------


def api_list(request: Request) -> Response:
    notes = current_store.find(Note).order_by(Note.id)
    return json_response([note.as_json() for note in notes])


def api_create(request: Request) -> Response:
    body = body_from_json(request)
    note = current_store.add(Note(body))
    current_store.flush()  # assigns note.id
    return json_response(note.as_json(), 201, {"Location": f"/api/notes/{note.id}"})


def api_get(request: Request, note_id: int) -> Response:
    return json_response(get_note(note_id).as_json())


def api_update(request: Request, note_id: int) -> Response:
    note = get_note(note_id)
    edit(note, body_from_json(request))
    return json_response(note.as_json())


def api_delete(request: Request, note_id: int) -> Response:
    current_store.remove(get_note(note_id))
    return Response(status=204)


# -- helpers ------------------------------------------------------------------------


def get_note(note_id: int) -> Note:
    note = current_store.get(Note, note_id) if 1 <= note_id <= MAX_ID else None
    if note is None:
        raise NotFound(f"there is no note {note_id}")
    return note


def edit(note: Note, body: str) -> None:
    note.body = body
    note.updated = datetime.now(timezone.utc).replace(tzinfo=None)


def body_too_large() -> RequestEntityTooLarge:
    return RequestEntityTooLarge(f"the request body must be at most {MAX_BODY_BYTES} bytes")


def read_body(request: Request) -> bytes:
    """The request body, of at most ``MAX_BODY_BYTES``; 413 for a larger one."""
    data = request.get_data()  # a larger Content-Length was refused in notes_app
    if len(data) > MAX_BODY_BYTES:
        # werkzeug stops reading a chunked body one byte past the limit,
        # silently: one that got that far is refused unread.
        raise body_too_large()
    return data


def body_from_json(request: Request) -> str:
    if not request.is_json:
        raise UnsupportedMediaType("send JSON, with Content-Type: application/json")
    try:
        data = json.loads(read_body(request).decode())
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    except (ValueError, RecursionError):  # a number too long, arrays nested too deep
        raise BadRequest("the request body is JSON too large to read") from None
    if not isinstance(data, dict):
        raise BadRequest('send a JSON object such as {"body": "text"}')
    return validated(data.get("body"))


def body_from_form(request: Request) -> str:
    if request.mimetype != FORM:
        raise UnsupportedMediaType(f"send the form as {FORM}")
    try:
        fields = parse_qs(read_body(request).decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("the form is not valid UTF-8") from None
    return validated(fields.get("body", [None])[0])


def validated(value: object) -> str:
    body, error = validate_body(value)
    if error:
        raise BadRequest(error)
    assert body is not None
    return body


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | list[tuple[str, str]] | None = None
) -> Response:
    return Response(json.dumps(data), status, headers, content_type="application/json")


class NoteIdConverter(IntegerConverter):
    """A note's id in a URL: 1 to 19 ASCII digits, as many as ``MAX_ID`` has.

    Any other path matches no route, a 404 whatever the method; ``get_note``
    answers 404 for a number out of range. (werkzeug's ``int(max=...)`` would
    make it a 405 for the methods of the other rules on the same path.)
    """

    regex = r"[0-9]{1,19}"


#: Each rule's endpoint is its view function.
URLS = Map(
    [
        Rule("/", endpoint=page, methods=["GET"]),
        Rule("/", endpoint=page_create, methods=["POST"]),
        Rule("/style.css", endpoint=stylesheet, methods=["GET"]),
        Rule("/notes/<id:note_id>", endpoint=page_edit, methods=["GET"]),
        Rule("/notes/<id:note_id>", endpoint=page_update, methods=["POST"]),
        Rule("/notes/<id:note_id>/delete", endpoint=page_confirm_delete, methods=["GET"]),
        Rule("/notes/<id:note_id>/delete", endpoint=page_delete, methods=["POST"]),
        Rule("/api/notes", endpoint=api_list, methods=["GET"]),
        Rule("/api/notes", endpoint=api_create, methods=["POST"]),
        Rule("/api/notes/<id:note_id>", endpoint=api_get, methods=["GET"]),
        Rule("/api/notes/<id:note_id>", endpoint=api_update, methods=["PUT"]),
        Rule("/api/notes/<id:note_id>", endpoint=api_delete, methods=["DELETE"]),
    ],
    converters={"id": NoteIdConverter},
)
