"""The same notes in a Flask application: middlestorm wraps ``app.wsgi_app``.

Its errors are JSON, ``{"error": "..."}``, as under the notes app's ``/api/``,
and a request body over ``MAX_BODY_BYTES`` is a 413 (``MAX_CONTENT_LENGTH``).
A transient database failure is not turned into a 500: it propagates, so that
middlestorm runs the request again (``PROPAGATE_EXCEPTIONS`` lets it out of
Flask).

::

    flask --app example_app.flask_app run
"""

from __future__ import annotations

from flask import Flask, abort, jsonify, request
from werkzeug.exceptions import HTTPException, InternalServerError

from example_app import schema
from example_app.app import MAX_BODY_BYTES
from example_app.config import database_uri
from example_app.models import Note, validate_body
from middlestorm import MiddleStorm, current_store
from middlestorm.retry import Verdict, classify


def create_app(db_uri: str | None = None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["PROPAGATE_EXCEPTIONS"] = True  # what the handler below re-raises gets out
    uri = database_uri(db_uri)
    schema.upgrade_database(uri)
    app.wsgi_app = MiddleStorm(app.wsgi_app, uri)  # type: ignore[method-assign]

    @app.get("/notes")
    def list_notes():
        return jsonify([note.as_json() for note in current_store.find(Note).order_by(Note.id)])

    @app.post("/notes")
    def create_note():
        body, error = validate_body(request.form.get("body"))
        if error:
            abort(400, error)
        note = current_store.add(Note(body))
        current_store.flush()
        return jsonify(note.as_json()), 201

    @app.errorhandler(HTTPException)  # an unexpected error too, as a 500
    def json_error(error: HTTPException):
        response = jsonify(error=error.description)
        response.status_code = error.code or 500
        response.headers.extend(
            (name, value) for name, value in error.get_headers() if name.lower() != "content-type"
        )  # such as a 405's Allow
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        if classify(error) is not Verdict.PERMANENT:
            raise error  # transient, or a commit in doubt: middlestorm's to handle
        app.logger.error("%s %s failed", request.method, request.path, exc_info=error)
        return json_error(InternalServerError())

    return app
