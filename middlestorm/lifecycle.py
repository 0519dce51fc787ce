"""How a unit of work (one request) ends: commit, or abort.

The rules, after repoze.tm2 and pyramid_tm: a unit of work that failed, whose
transaction is doomed, or whose response the commit veto rejects is aborted;
anything else is committed. A commit that fails is aborted too; the stores
keep their connections, rolled back, for the next unit of work (one the
database dropped is reopened by Storm when next used).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from transaction import ThreadTransactionManager, TransactionManager
from transaction.interfaces import ITransactionManager

from middlestorm.errors import CommitInDoubtError

if TYPE_CHECKING:
    from middlestorm.stores import StoreRegistry

__all__ = ["CommitVeto", "begin_transaction", "default_commit_veto", "end_transaction"]

log = logging.getLogger(__name__)

#: The key, in a transaction's ``extension``, of how many stores have committed.
COMMITTED_STORES = "middlestorm.committed_stores"

#: ``veto(environ, status, headers) -> bool``: true means abort.
CommitVeto = Callable[[dict[str, Any], str, Iterable[tuple[str, str]]], bool]


def default_commit_veto(
    environ: dict[str, Any], status: str, headers: Iterable[tuple[str, str]]
) -> bool:
    """Veto the commit of a 4xx or 5xx response.

    An ``X-Tm`` response header overrides the status: ``X-Tm: commit``
    commits, any other value aborts.
    """
    for name, value in headers:
        if len(name) == 4 and name.lower() == "x-tm":
            return value.strip().lower() != "commit"
    code = status[:3]
    if len(code) == 3 and code.isascii() and code.isdigit() and status[3:4] in ("", " "):
        return code >= "400"  # the usual "200 OK", without splitting it
    code = status.split(None, 1)[0] if status.strip() else ""
    return not code.isdigit() or int(code) >= 400


def thread_manager(manager: ITransactionManager) -> TransactionManager | None:
    """The calling thread's ``TransactionManager`` behind ``manager``, if it has one."""
    if isinstance(manager, ThreadTransactionManager):
        manager = manager.manager
    return manager if isinstance(manager, TransactionManager) else None


def begin_transaction(manager: ITransactionManager) -> None:
    """Begin a unit of work's transaction, or let its first use begin it.

    A transaction begun by ``manager.get()`` (a store joining, the app
    asking for it) is the one ``begin()`` would make, unless synchronizers
    must hear of it, the manager is explicit, or a transaction is under way
    (``begin()`` aborts it, with a warning if stores had joined it): only then
    is it begun now. A unit of work that never uses one costs no transaction
    at all.
    """
    inner = thread_manager(manager)
    if inner is None or inner._txn is not None or inner.explicit or inner._synchs:
        leftover = None if inner is None or inner.explicit else inner._txn
        if leftover is not None and leftover._resources:
            log.warning(
                "a unit of work begins while a transaction that stores joined is open in "
                "this thread (work done outside a unit of work, in a route without a "
                "request transaction, say): that transaction is rolled back"
            )
        manager.begin()


def under_way(manager: ITransactionManager) -> bool:
    """Whether the calling thread has a transaction of ``manager`` (true if it can't tell)."""
    inner = thread_manager(manager)
    return inner is None or inner._txn is not None


def end_transaction(registry: StoreRegistry, *, commit: bool) -> bool:
    """Commit the current transaction of the registry's manager, or abort it.

    A doomed transaction is aborted whatever ``commit`` says. When the commit
    itself fails, the transaction is aborted and the error is raised. With
    no transaction under way (none was used, or the app ended it), nothing
    is done.

    :returns: whether the transaction was committed.
    """
    manager = registry.transaction_manager
    if not under_way(manager):
        return False
    txn = manager.get()
    if not commit or txn.isDoomed():
        txn.abort()
        return False
    try:
        txn.commit()
    except CommitInDoubtError:
        abort_quietly(manager)
        raise
    except BaseException as error:
        committed = (txn.extension or {}).get(COMMITTED_STORES)
        abort_quietly(manager)
        if committed:
            raise CommitInDoubtError(
                f"the commit failed after {committed} store(s) had committed: "
                f"{type(error).__name__}: {str(error).strip()}"
            ) from error
        raise
    return True


def abort_quietly(manager: ITransactionManager) -> None:
    """Abort, logging rather than raising an error, for use while another is raised."""
    if not under_way(manager):
        return
    try:
        manager.abort()
    except Exception:
        log.exception("aborting the transaction failed")
