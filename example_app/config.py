"""Where the example app's database is."""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable naming the database URI.
DB_VARIABLE = "EXAMPLE_APP_DB"
#: The SQLite file used when no URI is given, relative to the current directory.
DEFAULT_SQLITE = Path("instance") / "notes.db"


DEFAULT_URI = f"sqlite:{DEFAULT_SQLITE}"


def database_uri(given: str | None = None) -> str:
    """``given``, else ``$EXAMPLE_APP_DB``, else the SQLite file (its folder created)."""
    return prepare(given or os.environ.get(DB_VARIABLE) or DEFAULT_URI)


def prepare(uri: str) -> str:
    """``uri``, after creating the default SQLite file's folder if it names that file."""
    if uri == DEFAULT_URI:
        DEFAULT_SQLITE.parent.mkdir(parents=True, exist_ok=True)
    return uri
