"""``python -m benchmarks <command> ...``: the one entry point of the suite."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

import benchmarks
from benchmarks import options, report

#: Commands that measure, in the order ``all`` runs them, with their modules.
MEASUREMENTS = {
    "inprocess": "benchmarks.inprocess",
    "statements": "benchmarks.statements",
    "servers": "benchmarks.servers",
    "threads": "benchmarks.threads",
    "memory": "benchmarks.memory",
}
#: Older scripts with their own options, reached through their ``main``.
DELEGATED = {
    "responses": ("benchmarks.responses", "memory for a HEAD, time for a file download"),
    "soak": ("benchmarks.soak", "minutes of load while PostgreSQL is broken, then an audit"),
    "workers": ("benchmarks.workers", "per-call cost of units of work for Twisted or asyncio"),
}


def first_line(module: str) -> str:
    """The module docstring's first sentence, without its ````command``: `` prefix."""
    paragraph = (importlib.import_module(module).__doc__ or "").strip().split("\n\n")[0]
    return re.sub(r"^``[\w-]+``: ", "", " ".join(paragraph.split()))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=benchmarks.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="command")
    for name, module_name in MEASUREMENTS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(
            name,
            help=first_line(module_name),
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        options.add_common(sub)
    from benchmarks import plot, suite

    sub = commands.add_parser("plot", help=first_line("benchmarks.plot"), description=plot.__doc__)
    plot.add_arguments(sub)
    sub = commands.add_parser(
        "all",
        help=first_line("benchmarks.suite"),
        description=suite.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suite.add_arguments(sub)
    options.add_common(sub)
    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, help=f"{summary} (its own options: {name} --help)")
    return top


def run_all(args: argparse.Namespace, command: str) -> None:
    """Each measurement in turn, with its own command line; then the charts and the summary."""
    from benchmarks import plot, suite

    print(f"$ {command}\n")
    top = parser()
    for sub_argv in suite.plan(args):
        sub = top.parse_args(sub_argv)
        importlib.import_module(MEASUREMENTS[sub.command]).run(sub, report.command_line(sub_argv))
    plot_argv = ["plot", "--results", str(args.results)]
    plot.run(top.parse_args(plot_argv), report.command_line(plot_argv))
    for path in suite.summarize(args.results, command):
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        sys.argv = [f"python -m benchmarks {argv[0]}", *argv[1:]]
        return module.main() or 0
    args = parser().parse_args(argv)
    command = report.command_line(argv)
    if args.command == "plot":
        from benchmarks import plot

        plot.run(args, command)
    elif args.command == "all":
        run_all(args, command)
    else:
        importlib.import_module(MEASUREMENTS[args.command]).run(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
