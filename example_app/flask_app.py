"""The same notes in a Flask application: middlestorm wraps ``app.wsgi_app``.

::

    flask --app example_app.flask_app run
"""

from __future__ import annotations

from flask import Flask, abort, jsonify, request

from example_app import schema
from example_app.config import database_uri
from example_app.models import Note, validate_body
from middlestorm import MiddleStorm, current_store


def create_app(db_uri: str | None = None) -> Flask:
    app = Flask(__name__)
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

    return app
