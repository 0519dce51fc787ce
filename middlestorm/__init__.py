"""middlestorm: Storm stores for multithreaded WSGI applications.

One store per thread, put in ``environ``; one transaction per request,
committed or aborted through the Zope transaction manager.
"""

from middlestorm.context import current_registry, current_store, get_store, use_registry
from middlestorm.databases import open_database, redact_uri
from middlestorm.errors import (
    CommitInDoubtError,
    ConfigurationError,
    MiddleStormError,
    NoRequestError,
    UnknownStoreError,
    WrongThreadError,
)
from middlestorm.handles import ThreadStores
from middlestorm.lifecycle import default_commit_veto, end_transaction
from middlestorm.retry import DEFAULT_POLICY, RetryPolicy
from middlestorm.stores import DEFAULT_STORE, StoreRegistry
from middlestorm.timeouts import Timeouts
from middlestorm.work import run_in_transaction
from middlestorm.wsgi import MiddleStorm, decorator, make_middleware

__version__ = "1.0.0.dev0"

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_STORE",
    "CommitInDoubtError",
    "ConfigurationError",
    "MiddleStorm",
    "MiddleStormError",
    "NoRequestError",
    "RetryPolicy",
    "StoreRegistry",
    "ThreadStores",
    "Timeouts",
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
    "run_in_transaction",
    "use_registry",
]
