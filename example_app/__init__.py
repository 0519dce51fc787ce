"""A notes application: middlestorm around an ordinary werkzeug WSGI app.

Run it with ``python -m example_app`` (``--help`` lists the options).
"""

from example_app.app import create_app

__all__ = ["create_app"]
