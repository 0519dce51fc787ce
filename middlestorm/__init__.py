"""middlestorm: Storm stores for multithreaded WSGI applications.

One store per thread, put in ``environ``; one transaction per request,
committed or aborted through the Zope transaction manager.
"""

from middlestorm.context import current_registry, current_store, get_store, use_registry
from middlestorm.databases import open_database, redact_uri
from middlestorm.errors import (
    ConfigurationError,
    MiddleStormError,
    NoRequestError,
    UnknownStoreError,
    WrongThreadError,
)
from middlestorm.handles import ThreadStores
from middlestorm.lifecycle import default_commit_veto, end_transaction
from middlestorm.stores import DEFAULT_STORE, StoreRegistry
from middlestorm.wsgi import MiddleStorm, decorator, make_middleware

__version__ = "1.0.0.dev0"

__all__ = [
    "DEFAULT_STORE",
    "ConfigurationError",
    "MiddleStorm",
    "MiddleStormError",
    "NoRequestError",
    "StoreRegistry",
    "ThreadStores",
    "UnknownStoreError",
    "WrongThreadError",
    "current_registry",
    "current_store",
    "decorator",
    "default_commit_veto",
    "end_transaction",
    "get_store",
    "make_middleware",
    "open_database",
    "redact_uri",
    "use_registry",
]
