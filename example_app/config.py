"""Where the example app's database is."""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable naming the database URI.
DB_VARIABLE = "EXAMPLE_APP_DB"
#: The SQLite file used when no URI is given, relative to the current directory.
DEFAULT_SQLITE = Path("instance") / "notes.db"


def database_uri(given: str | None = None) -> str:
    """``given``, else ``$EXAMPLE_APP_DB``, else the SQLite file (its folder created)."""
    uri = given or os.environ.get(DB_VARIABLE)
    if uri:
        return uri
    DEFAULT_SQLITE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:{DEFAULT_SQLITE}"
