"""Routes and views: an HTML page with forms, and a JSON API for the same notes."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from werkzeug.exceptions import BadRequest, HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.utils import redirect
from werkzeug.wrappers import Request, Response

from example_app import schema
from example_app.models import MAX_LENGTH, Note, validate_body
from middlestorm import MiddleStorm, current_store


def create_app(db_uri: str, *, server_timing: bool = False) -> MiddleStorm:
    """The notes application on the database at ``db_uri``, wrapped in MiddleStorm.

    The schema is created or upgraded first, with this thread's store.
    """
    app = MiddleStorm(notes_app, db_uri, server_timing=server_timing)
    schema.upgrade(app.registry.get())
    app.registry.transaction_manager.commit()
    return app


def paste_app_factory(global_conf: dict[str, str], **local_conf: str) -> Callable:
    """The bare notes app for Paste Deploy, where middlestorm is a filter (deploy.ini)."""
    schema.upgrade_database(global_conf["db_uri"])
    return notes_app


@Request.application
def notes_app(request: Request) -> Response:
    adapter = URLS.bind_to_environ(request.environ)
    try:
        view, values = adapter.match()
        return view(request, **values)
    except HTTPException as error:
        if request.path.startswith("/api/"):
            return json_response({"error": error.description}, error.code)
        return error.get_response(request.environ)


# -- the HTML page ------------------------------------------------------------------


def page(request: Request, error: str | None = None, status: int = 200) -> Response:
    notes = current_store.find(Note).order_by(Note.id)
    items = "\n".join(
        f"""<li><form method="post" action="/notes/{note.id}">
  <input name="body" value="{html.escape(note.body)}" maxlength="{MAX_LENGTH}">
  <button>Save</button></form>
  <form method="post" action="/notes/{note.id}/delete"><button>Delete</button></form></li>"""
        for note in notes
    )
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Notes</title></head>
<body><h1>Notes</h1>{message}
<form method="post" action="/">
  <input name="body" placeholder="A new note" maxlength="{MAX_LENGTH}" autofocus>
  <button>Add</button></form>
<ul>
{items}
</ul>
<p>The same notes as JSON: <a href="/api/notes">/api/notes</a></p></body></html>"""
    return Response(body, status, content_type="text/html; charset=utf-8")


def page_create(request: Request) -> Response:
    body, error = validate_body(request.form.get("body"))
    if error:
        return page(request, error, 400)
    current_store.add(Note(body))
    return redirect("/", 303)


def page_update(request: Request, note_id: int) -> Response:
    note = get_note(note_id)
    body, error = validate_body(request.form.get("body"))
    if error:
        return page(request, error, 400)
    edit(note, body)
    return redirect("/", 303)


def page_delete(request: Request, note_id: int) -> Response:
    current_store.remove(get_note(note_id))
    return redirect("/", 303)


# -- the JSON API -------------------------------------------------------------------


def api_list(request: Request) -> Response:
    notes = current_store.find(Note).order_by(Note.id)
    return json_response([note.as_json() for note in notes])


def api_create(request: Request) -> Response:
    body = body_from_json(request)
    note = current_store.add(Note(body))
    current_store.flush()  # assigns note.id
    return json_response(note.as_json(), 201, Location=f"/api/notes/{note.id}")


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
    note = current_store.get(Note, note_id)
    if note is None:
        raise NotFound(f"there is no note {note_id}")
    return note


def edit(note: Note, body: str) -> None:
    note.body = body
    note.updated = datetime.now(timezone.utc).replace(tzinfo=None)


def body_from_json(request: Request) -> str:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadRequest('send a JSON object such as {"body": "text"}')
    body, error = validate_body(data.get("body"))
    if error:
        raise BadRequest(error)
    return body


def json_response(data: Any, status: int = 200, **headers: str) -> Response:
    return Response(json.dumps(data), status, headers, content_type="application/json")


#: Each rule's endpoint is its view function.
URLS = Map(
    [
        Rule("/", endpoint=page, methods=["GET"]),
        Rule("/", endpoint=page_create, methods=["POST"]),
        Rule("/notes/<int:note_id>", endpoint=page_update, methods=["POST"]),
        Rule("/notes/<int:note_id>/delete", endpoint=page_delete, methods=["POST"]),
        Rule("/api/notes", endpoint=api_list, methods=["GET"]),
        Rule("/api/notes", endpoint=api_create, methods=["POST"]),
        Rule("/api/notes/<int:note_id>", endpoint=api_get, methods=["GET"]),
        Rule("/api/notes/<int:note_id>", endpoint=api_update, methods=["PUT"]),
        Rule("/api/notes/<int:note_id>", endpoint=api_delete, methods=["DELETE"]),
    ]
)
