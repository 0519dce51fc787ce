"""A first middlestorm application: notes in SQLite, one transaction per request.

Run it with ``python docs/first_app.py 8000`` (see docs/getting-started.rst).
"""

import sys

from storm.locals import Int, Unicode
from werkzeug.serving import run_simple
from werkzeug.wrappers import Request, Response

from middlestorm import MiddleStorm, current_store


class Note:
    __storm_table__ = "note"
    id = Int(primary=True)
    body = Unicode()

    def __init__(self, body):
        self.body = body


@Request.application
def notes(request):
    if request.method == "POST":
        current_store.add(Note(request.form["body"]))
        return Response("saved\n", 201)  # committed before the 201 is sent
    bodies = [note.body for note in current_store.find(Note).order_by(Note.id)]
    return Response("".join(f"{body}\n" for body in bodies))


app = MiddleStorm(notes, "sqlite:notes.db")

# The table, made once with the application's own store and transaction manager.
app.registry.get().execute("CREATE TABLE IF NOT EXISTS note (id INTEGER PRIMARY KEY, body TEXT)")
app.registry.transaction_manager.commit()

if __name__ == "__main__":
    run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=True)
