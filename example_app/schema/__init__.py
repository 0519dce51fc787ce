"""The database schema, created or upgraded at start-up with ``storm.schema``.

A new database gets the ``CREATES`` statements and every patch marked as
applied; an older one gets the patches it lacks (``patch_N.py`` here).
"""

import sys
import time

from storm.database import Database, create_database
from storm.exceptions import StormError
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
#: Any number, the same in every process: the advisory lock schema changes take.
LOCK_KEY = 4_711_001
DELETES = ["DELETE FROM note"]


def schema_for(database: Database) -> Schema:
    scheme = database.get_uri().scheme
    if scheme not in CREATES:
        raise ValueError(f"the example app supports {', '.join(CREATES)} databases, not {scheme}")
    return Schema(CREATES[scheme], DROPS, DELETES, sys.modules[__name__])


def upgrade_database(db_uri: str) -> None:
    """Create or upgrade the schema of the database at ``db_uri``, with a store of its own."""
    store = Store(create_database(db_uri))
    try:
        upgrade(store)
    finally:
        store.close()


def upgrade(store: Store, attempts: int = 5) -> None:
    """Create the schema in ``store``'s database, or apply the patches it lacks.

    Processes that start together (gunicorn's workers) take turns: on
    PostgreSQL behind an advisory lock; on SQLite, whose second writer fails
    instead of waiting, by trying again once the first has committed.
    """
    schema = schema_for(store.get_database())
    postgres = store.get_database().get_uri().scheme == "postgres"
    for attempt in range(1, attempts + 1):
        try:
            if postgres:
                store.execute("SELECT pg_advisory_lock(?)", (LOCK_KEY,))
            try:
                schema.upgrade(store)
                store.commit()
            finally:
                if postgres:
                    store.rollback()
                    store.execute("SELECT pg_advisory_unlock(?)", (LOCK_KEY,))
                    store.commit()
            return
        except StormError:
            store.rollback()
            if attempt == attempts:
                raise
            time.sleep(0.1 * attempt)
