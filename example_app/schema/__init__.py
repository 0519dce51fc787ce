"""The database schema, created or upgraded at start-up with ``storm.schema``.

A new database gets the ``CREATES`` statements and every patch marked as
applied; an older one gets the patches it lacks (``patch_N.py`` here).
"""

import sys

from storm.database import Database
from storm.schema import Schema
from storm.store import Store

CREATES = {
    "sqlite": [
        "CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT NOT NULL,"
        " created TIMESTAMP NOT NULL, updated TIMESTAMP)",
    ],
    "postgres": [
        "CREATE TABLE note (id SERIAL PRIMARY KEY, body TEXT NOT NULL,"
        " created TIMESTAMP NOT NULL, updated TIMESTAMP)",
    ],
}
DROPS = ["DROP TABLE IF EXISTS note"]
DELETES = ["DELETE FROM note"]


def schema_for(database: Database) -> Schema:
    scheme = database.get_uri().scheme
    if scheme not in CREATES:
        raise ValueError(f"the example app supports {', '.join(CREATES)} databases, not {scheme}")
    return Schema(CREATES[scheme], DROPS, DELETES, sys.modules[__name__])


def upgrade(database: Database) -> None:
    """Create the schema, or apply the patches it lacks."""
    store = Store(database)
    try:
        schema_for(database).upgrade(store)
        store.commit()
    finally:
        store.close()
