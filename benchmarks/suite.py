"""``all``: every measurement, then the charts, then a summary to paste into the README.

Runs ``inprocess``, ``statements``, ``servers``, ``threads`` and ``memory``
one after the other (never two at once), each printing the command line that
repeats it, writes their JSON to the results folder, draws the PNGs under
``docs/`` and writes ``summary.rst`` and ``summary.md`` next to the JSON.
``--quick`` shrinks every size so the whole suite takes a minute or two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import report

#: Sizes per command: the full run, then ``--quick``.
SIZES = {
    "inprocess": (["--requests", "3000", "--rounds", "5"], ["--requests", "300", "--rounds", "2"]),
    "statements": (["--requests", "200"], ["--requests", "20"]),
    "servers": (["--seconds", "3", "--rounds", "3"], ["--seconds", "1", "--rounds", "1"]),
    "threads": (["--requests", "2000", "--rounds", "3"], ["--requests", "200", "--rounds", "1"]),
    "memory": (["--requests", "100000"], ["--requests", "2000", "--store-threads", "8"]),
}
#: Options every measurement shares, passed on as given.
SHARED = ["databases", "postgres", "postgres_admin", "sqlite_options", "rows", "contenders",
          "routes"]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--rounds", type=int, help="rounds for inprocess, servers and threads (overrides)"
    )
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=list(SIZES), help="measurements to leave out"
    )


def plan(args: argparse.Namespace) -> list[list[str]]:
    """The argument lists of the commands ``all`` runs, in order."""
    shared: list[str] = []
    for name in SHARED:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        shared += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    shared += ["--results", str(args.results)]
    commands = []
    for command, (full, quick) in SIZES.items():
        if command in args.skip:
            continue
        sizes = list(quick if args.quick else full)
        if args.rounds is not None and "--rounds" in sizes:
            sizes[sizes.index("--rounds") + 1] = str(args.rounds)
        commands.append([command, *sizes, *shared])
    return commands


def summarize(results: Path, command: str | None = None) -> list[Path]:
    """Write ``summary.rst`` and ``summary.md``: each command line and its tables
    (``command``: the ``all`` that ran them)."""
    rst, markdown = [], []
    for name in SIZES:
        data = report.load(name, results)
        if data is None:
            continue
        tables = [report.Table.from_dict(table) for table in data["tables"]]
        rst += [f"::\n\n    $ {data['command']}\n", *(t.rst() + "\n" for t in tables)]
        markdown += [f"```\n$ {data['command']}\n```\n", *(t.markdown() + "\n" for t in tables)]
    said = "Measured with {0}{1}{0}, one command after the other:\n"
    paths = [results / "summary.rst", results / "summary.md"]
    paths[0].write_text("\n".join(([said.format("``", command)] if command else []) + rst))
    paths[1].write_text("\n".join(([said.format("`", command)] if command else []) + markdown))
    return paths
