"""Results: the command line that made them, JSON files, and tables in RST or Markdown."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run."""
    return shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict[str, Any]:
    """What the figures depend on besides the code."""
    versions: dict[str, str | None] = {}
    for package in ("middlestorm", "storm", "transaction", "repoze.tm2", "waitress", "gunicorn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "versions": versions,
    }


def save(name: str, command: str, data: dict[str, Any], folder: Path = RESULTS) -> Path:
    """Write ``folder/name.json`` with the command and the machine; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {
        "command": command,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return path


def load(name: str, folder: Path = RESULTS) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Table:
    """A table of text cells; printed as an RST simple table or as Markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def _widths(self) -> list[int]:
        return [
            max(len(row[i]) for row in [self.headers, *self.rows]) for i in range(len(self.headers))
        ]

    def rst(self) -> str:
        widths = self._widths()
        rule = "  ".join("=" * width for width in widths)

        def line(cells: list[str]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

        body = [rule, line(self.headers), rule, *(line(row) for row in self.rows), rule]
        return "\n".join([self.title, "", *(row.rstrip() for row in body), *self._notes()])

    def markdown(self) -> str:
        widths = self._widths()

        def line(cells: list[str]) -> str:
            padded = (cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            return "| " + " | ".join(padded) + " |"

        rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
        body = [line(self.headers), rule, *(line(row) for row in self.rows)]
        return "\n".join([f"**{self.title}**", "", *body, *self._notes()])

    def _notes(self) -> list[str]:
        return ["", *self.notes] if self.notes else []

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "headers": self.headers,
            "rows": self.rows,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Table:
        return cls(data["title"], data["headers"], data["rows"], data.get("notes", []))


def publish(
    name: str,
    command: str,
    args: Any,
    sizes: Sequence[str],
    cases: Any,
    tables: Sequence[Table],
) -> dict[str, Any]:
    """Print the tables, and save them with the cases and the sizes (``args``' attributes)."""
    show(command, tables)
    data = {
        "sizes": {key: getattr(args, key) for key in sizes},
        "cases": cases,
        "tables": [table.as_dict() for table in tables],
    }
    save(name, command, data, args.results)
    return data


def show(command: str, tables: Sequence[Table]) -> None:
    """Print the command line, then each table."""
    print(f"$ {command}\n")
    for table in tables:
        print(table.rst(), end="\n\n", flush=True)
