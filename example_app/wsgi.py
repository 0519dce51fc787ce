"""The notes app for production WSGI servers; the database comes from $EXAMPLE_APP_DB.

::

    gunicorn -k gthread --threads 4 -w 2 example_app.wsgi:app
    waitress-serve --threads 4 example_app.wsgi:app
    twist web --wsgi example_app.wsgi.app

The app refuses a request body over ``MAX_BODY_BYTES`` (64 KiB) with 413
without reading it. gunicorn hands the body over as it arrives, so the 413
comes at once; waitress and twisted receive the whole body first (into a
temporary file) and only then call the app. Give waitress the same limit,
``--max-request-body-size=65536``, and it answers 413 itself, early.

A worker that starts while the database is down (restarting, say) waits up to
20 s for it rather than exit: gunicorn stops the whole server when a worker
fails to boot.
"""

from example_app.app import create_app
from example_app.config import database_uri

app = create_app(database_uri(), wait_for_database=20)
