"""The database schema, created or upgraded at start-up with ``storm.schema``.

A new database gets the ``CREATES`` statements and every patch marked as
applied; an older one gets the patches it lacks (``patch_N.py`` here).
"""

import fcntl
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from storm.database import Database, create_database
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


def upgrade(store: Store) -> None:
    """Create the schema in ``store``'s database, or apply the patches it lacks.

    The upgrade is one transaction, and processes that start together
    (gunicorn's workers) take turns: on PostgreSQL through an advisory lock,
    on SQLite through a lock on the database file.
    """
    schema = schema_for(store.get_database())
    schema.autocommit(False)
    with one_process_at_a_time(store):
        try:
            schema.upgrade(store)
            store.commit()
        except BaseException:
            store.rollback()
            raise


@contextmanager
def one_process_at_a_time(store: Store) -> Iterator[None]:
    uri = store.get_database().get_uri()
    if uri.scheme == "postgres":
        store.execute("SELECT pg_advisory_lock(?)", (LOCK_KEY,))
        store.commit()  # a session lock: the upgrade's snapshot is taken after it
        try:
            yield
        finally:
            store.execute("SELECT pg_advisory_unlock(?)", (LOCK_KEY,))
            store.commit()
    elif uri.scheme == "sqlite" and uri.database not in (None, "", ":memory:"):
        # flock() locks are separate from the fcntl() locks SQLite takes.
        with open(uri.database, "ab") as database_file:
            fcntl.flock(database_file, fcntl.LOCK_EX)
            yield
    else:
        yield
