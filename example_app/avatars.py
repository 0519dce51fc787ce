"""Twisted's database tutorial, with Storm objects instead of rows.

The classic ``twisted.enterprise.adbapi`` example looks users up by login and
prints a line for each, several lookups at once, gathered with a
``DeferredList``; it runs raw SQL and gets tuples back. Here each lookup is a
function that uses the ORM in a worker thread's own store, run as a unit of
work by :class:`middlestorm.twisted.DeferredStores`; the reactor gets back
the line, a plain string::

    python -m example_app.avatars [URI] [LOGIN ...]

With no URI it uses a SQLite file in a temporary folder. Its table
(``avatar_user``) is made and filled on first use.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from storm.locals import Int, Unicode
from twisted.internet import defer, task

from middlestorm import StoreRegistry
from middlestorm.twisted import DeferredStores

USERS = [("alice", "Alice Liddell", "a white rabbit"), ("bob", "Bob Dobbs", "a pipe")]
TABLE = {
    "sqlite": "CREATE TABLE IF NOT EXISTS avatar_user "
    "(id INTEGER PRIMARY KEY, login TEXT UNIQUE NOT NULL, name TEXT NOT NULL, avatar TEXT)",
    "postgres": "CREATE TABLE IF NOT EXISTS avatar_user "
    "(id SERIAL PRIMARY KEY, login TEXT UNIQUE NOT NULL, name TEXT NOT NULL, avatar TEXT)",
}


class User:
    __storm_table__ = "avatar_user"
    id = Int(primary=True)
    login = Unicode()
    name = Unicode()
    avatar = Unicode()

    def __init__(self, login: str, name: str, avatar: str) -> None:
        self.login, self.name, self.avatar = login, name, avatar


def avatar_line(registry: StoreRegistry, login: str) -> str:
    """The line for ``login``: runs in a worker thread, returns a plain string."""
    user = registry.get().find(User, login=login).one()
    if user is None:
        return f"{login}: no such user"
    return f"{user.name} ({user.login}) has the avatar {user.avatar}"


def make_table(registry: StoreRegistry, kind: str) -> None:
    store = registry.get()
    store.execute(TABLE[kind])
    for login, name, avatar in USERS:
        if store.find(User, login=login).is_empty():
            store.add(User(login, name, avatar))


async def show(reactor: Any, uri: str, logins: list[str]) -> None:
    registry = StoreRegistry({"main": uri})
    stores = DeferredStores(registry, reactor=reactor, workers=4)
    await stores.run(make_table, registry, "postgres" if uri.startswith("postgres") else "sqlite")
    lookups = [stores.run(avatar_line, registry, login) for login in logins]
    for succeeded, line in await defer.DeferredList(lookups, consumeErrors=True):
        print(line if succeeded else f"lookup failed: {line.getErrorMessage()}")


def main(argv: list[str]) -> None:
    uri = argv[0] if argv else f"sqlite:{Path(tempfile.mkdtemp()) / 'avatars.db'}"
    logins = argv[1:] or ["alice", "bob", "carol"]
    task.react(lambda reactor: defer.ensureDeferred(show(reactor, uri, logins)))


if __name__ == "__main__":
    main(sys.argv[1:])
