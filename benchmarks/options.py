"""Options every command shares: which databases, contenders and routes, where results go."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks import databases
from benchmarks.contenders import CONTENDERS, ROUTES
from benchmarks.report import RESULTS


def add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("databases, contenders and output")
    group.add_argument(
        "--databases", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"],
        help="default: both",
    )  # fmt: skip
    group.add_argument(
        "--postgres", metavar="URI", default=databases.DEFAULT_POSTGRES,
        help=f"the benchmark's database, made if missing (default {databases.DEFAULT_POSTGRES})",
    )  # fmt: skip
    group.add_argument(
        "--postgres-admin", metavar="CONNINFO", default=databases.DEFAULT_ADMIN,
        help="libpq connection string used to create the role and database and to count "
        f"sessions (default '{databases.DEFAULT_ADMIN}')",
    )  # fmt: skip
    group.add_argument(
        "--sqlite-options", default=databases.DEFAULT_SQLITE_OPTIONS,
        help="Storm SQLite URI options, e.g. 'timeout=30&synchronous=OFF' "
        f"(default '{databases.DEFAULT_SQLITE_OPTIONS}')",
    )  # fmt: skip
    group.add_argument(
        "--rows", type=int, default=databases.DEFAULT_ROWS,
        help=f"rows of the table per contender (default {databases.DEFAULT_ROWS:,})",
    )  # fmt: skip
    group.add_argument(
        "--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS),
        help="default: all four",
    )  # fmt: skip
    group.add_argument(
        "--routes", nargs="+", choices=list(ROUTES), default=list(ROUTES), help="default: all four"
    )
    group.add_argument(
        "--results", type=Path, default=RESULTS,
        help="folder for the JSON results (default benchmarks/results)",
    )  # fmt: skip


def chosen_contenders(args: argparse.Namespace) -> list[str]:
    """The contenders asked for, in the canonical order."""
    return [name for name in CONTENDERS if name in args.contenders]


def chosen_routes(args: argparse.Namespace) -> list[str]:
    return [name for name in ROUTES if name in args.routes]


@contextmanager
def open_targets(args: argparse.Namespace) -> Iterator[list[databases.Target]]:
    """The databases asked for, each contender with ``--rows`` rows of its own."""
    rows = args.rows * len(CONTENDERS)
    with databases.targets(
        args.databases, args.postgres, args.postgres_admin, rows, args.sqlite_options
    ) as targets:
        yield targets
