"""The notes app for production WSGI servers; the database comes from $EXAMPLE_APP_DB.

::

    gunicorn -k gthread --threads 4 -w 2 example_app.wsgi:app
    waitress-serve --threads 4 example_app.wsgi:app
    twist web --wsgi example_app.wsgi.app
"""

from example_app.app import create_app
from example_app.config import database_uri

app = create_app(database_uri())
