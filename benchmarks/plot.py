"""``plot``: PNG charts under ``docs/`` from the saved JSON results, and the summary tables.

* ``inprocess_requests.png``: requests/s by route and contender, one panel
  per thread count (log scale; bars are medians, whiskers min-max);
* ``inprocess_cost.png``: own cost in µs per request over the baseline
  (bare on ``/nodb``, by hand elsewhere);
* ``servers_requests.png``: requests/s under wrk, one panel per server
  (when ``servers.json`` exists);
* ``summary.rst`` and ``summary.md`` next to the JSON: every saved table with
  the command line that made it, to paste into the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.contenders import CONTENDERS, ROUTES
from benchmarks.processes import CHECKOUT

DOCS = CHECKOUT / "docs"
COLOURS = {"bare": "#9e9e9e", "by-hand": "#4c72b0", "repoze": "#dd8452", "middlestorm": "#55a868"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results", type=Path, default=report.RESULTS, help="where the JSON results are"
    )
    parser.add_argument("--output", type=Path, default=DOCS, help="where the PNGs go (docs/)")


def _groups(cases: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(database, route) pairs in a stable order: nodb first, then by database and route."""
    seen = {(case["database"], case["route"]) for case in cases}
    order = list(ROUTES)
    databases = ["none", "SQLite", "PostgreSQL"]
    return sorted(seen, key=lambda pair: (databases.index(pair[0]), order.index(pair[1])))


def _bars(axes: Any, cases: list[dict[str, Any]], key: str, skip_baseline: bool = False) -> None:
    """Grouped bars of ``summary[key]`` (median, whiskers min-max) by (database, route)."""
    groups = _groups(cases)
    names = [name for name in CONTENDERS if any(c["contender"] == name for c in cases)]
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        xs, heights, low, high = [], [], [], []
        for position, (database, route) in enumerate(groups):
            for case in cases:
                if (case["database"], case["route"], case["contender"]) != (database, route, name):
                    continue
                if skip_baseline and case["contender"] == case.get("cost_baseline"):
                    continue
                value = case["summary"].get(key)
                if value is None:
                    continue
                xs.append(position + (index - (len(names) - 1) / 2) * width)
                heights.append(value["median"])
                low.append(value["median"] - value["min"])
                high.append(value["max"] - value["median"])
        if xs:
            axes.bar(
                xs, heights, width, yerr=[low, high], capsize=2,
                label=CONTENDERS[name].label, color=COLOURS[name],
            )  # fmt: skip
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(
        [f"{route}\n{'no db' if db == 'none' else db}" for db, route in groups], fontsize=8
    )
    axes.grid(axis="y", alpha=0.3)


def _figure(panels: dict[str, list[dict[str, Any]]], key: str, ylabel: str, title: str,
            path: Path, log: bool = False, skip_baseline: bool = False) -> Path:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes_list = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for axes, (label, cases) in zip(axes_list[:, 0], panels.items(), strict=True):
        _bars(axes, cases, key, skip_baseline)
        axes.set_title(label, fontsize=10)
        axes.set_ylabel(ylabel)
        if log:
            axes.set_yscale("log")
        else:
            axes.axhline(0, color="black", linewidth=0.6)
    axes_list[0, 0].legend(fontsize=8, ncols=4, loc="upper right")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(args: argparse.Namespace, command: str) -> list[Path]:
    written = []
    inprocess = report.load("inprocess", args.results)
    if inprocess is not None:
        panels: dict[str, list[dict[str, Any]]] = {}
        for case in inprocess["cases"]:
            panels.setdefault(f"{case['threads']} thread(s)", []).append(case)
        sizes = inprocess["sizes"]
        note = f"({sizes['rounds']} rounds of {sizes['requests']:,} requests)"
        written.append(_figure(
            panels, "per_second", "requests/s", f"In process, requests/s {note}",
            args.output / "inprocess_requests.png", log=True,
        ))  # fmt: skip
        written.append(_figure(
            panels, "cost_us", "µs per request over baseline",
            f"In process, own cost over bare (/nodb) or by hand {note}",
            args.output / "inprocess_cost.png", skip_baseline=True,
        ))  # fmt: skip
    servers = report.load("servers", args.results)
    if servers is not None:
        panels = {}
        for case in servers["cases"]:
            panels.setdefault(case["server"], []).append(case)
        written.append(_figure(
            panels, "per_second", "requests/s",
            f"Servers under wrk, requests/s ({servers['sizes']['rounds']} rounds of "
            f"{servers['sizes']['seconds']} s)",
            args.output / "servers_requests.png",
        ))  # fmt: skip
    if not written:
        raise SystemExit(f"no results in {args.results}: run a measurement first")
    from benchmarks import suite

    written += suite.summarize(args.results)
    print(f"$ {command}")
    for path in written:
        print(f"wrote {path.relative_to(CHECKOUT) if path.is_relative_to(CHECKOUT) else path}")
    return written
