"""The exceptions middlestorm raises."""

from __future__ import annotations

import threading

from storm.exceptions import DisconnectionError
from storm.zope.interfaces import ZStormError

__all__ = [
    "CommitInDoubtError",
    "ConfigurationError",
    "MiddleStormError",
    "NoRequestError",
    "UnknownStoreError",
    "WrongThreadError",
]


class MiddleStormError(Exception):
    """Base class of every error middlestorm raises itself."""


class ConfigurationError(MiddleStormError, ValueError):
    """A database URI, store name or option given to middlestorm is unusable."""


class UnknownStoreError(MiddleStormError, LookupError):
    """A store was asked for by a name that was never configured."""


class NoRequestError(MiddleStormError, RuntimeError):
    """``current_store`` was used where no request (or bound registry) is active."""


class WrongThreadError(MiddleStormError, ZStormError):
    """A store was used from a thread other than the one it belongs to.

    It subclasses Storm's ``ZStormError``, which Storm raises for the same
    mistake when it notices it first.
    """

    @classmethod
    def for_store(
        cls, what: str, owner: int | None = None, owner_name: str | None = None
    ) -> WrongThreadError:
        """The error for ``what`` (``"the store 'main'"``), used from the calling thread."""
        current = threading.current_thread()
        if owner is None:
            belongs = "belongs to another thread"
        else:
            belongs = f"belongs to thread {owner}" + (f" ({owner_name!r})" if owner_name else "")
        return cls(
            f"{what} {belongs} and was used from thread {current.ident} ({current.name!r}); "
            "Storm stores are not thread-safe, and a request's store ends with the request: "
            "in another thread, use a store of its own (StoreRegistry.get() there) and end "
            "its transaction there"
        )


class CommitInDoubtError(MiddleStormError, DisconnectionError):
    """A COMMIT failed in a way that leaves its outcome unknown.

    The connection was lost while the COMMIT was under way (the database may
    have committed), or one database committed and another then failed. The
    unit of work is never run again: it might be done twice.
    """
