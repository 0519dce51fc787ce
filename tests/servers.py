"""Real servers in their own processes, and HTTP clients that keep score."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds, for one HTTP request and for a server to start
#: How many of the log's last lines an assertion about a server shows.
TAIL_LINES = 60
#: The most lines of a faulthandler dump shown (one block per thread).
DUMP_LINES = 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def describe_returncode(code: int | None) -> str:
    """A process's return code in words."""
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by {signal_name(-code)}"
    if 256 - code in SIGNALS:
        # werkzeug's reloader ends with sys.exit(its child's return code), so
        # a child killed by SIGSEGV (-11) makes the parent exit with 245.
        return (
            f"exited with {code}, which is 256 - {256 - code}: if it passed on a child's"
            f" return code, as werkzeug's reloader does, a child was killed by"
            f" {signal_name(256 - code)}"
        )
    return f"exited with {code}"


SIGNALS = {int(number) for number in signal.Signals}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


#: How the lines of a faulthandler report after its first begin.
DUMP_PREFIXES = (
    "Python runtime state",
    "Thread 0x",
    "Current thread 0x",
    "  ",
    "Extension modules",
)


def faulthandler_dump(lines: list[str]) -> tuple[int, list[str]]:
    """Where the first faulthandler report in ``lines`` starts, and its lines:
    from ``Fatal Python error`` through every thread's traceback (at most
    ``DUMP_LINES``); ``(-1, [])`` when there is none."""
    for start, line in enumerate(lines):
        if line.startswith("Fatal Python error"):
            end = start + 1
            while end < min(len(lines), start + DUMP_LINES) and (
                not lines[end] or lines[end].startswith(DUMP_PREFIXES)
            ):
                end += 1
            return start, lines[start:end]
    return -1, []


@dataclass
class Server:
    """A server process started in its own process group, and its output."""

    process: subprocess.Popen
    base_url: str
    log: Path
    command: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def report(self, around: str | None = None, lines: int = TAIL_LINES) -> str:
        """What an assertion about this server shows, rather than its whole log:
        whether it runs or how it ended, its faulthandler dump if it crashed,
        the lines around the first one containing ``around`` if given, and the
        last ``lines`` lines of its log."""
        log = self.output.splitlines()
        name = " ".join(self.command[:4]) or "the server"
        parts = [f"{name} (pid {self.process.pid}) {describe_returncode(self.process.poll())}"]
        tail_start = max(0, len(log) - lines)

        def excerpt(title: str, first: int, excerpt_lines: list[str]) -> None:
            last = first + len(excerpt_lines)
            parts.append(f"--- {title}: {self.log}, lines {first + 1}-{last} of {len(log)} ---")
            parts.extend(excerpt_lines)

        dump_start, dump = faulthandler_dump(log)
        if dump and dump_start < tail_start:  # else the tail shows it
            excerpt("faulthandler dump", dump_start, dump[: tail_start - dump_start])
        if around is not None:
            found = next((i for i, line in enumerate(log) if around in line), -1)
            if 0 <= found < tail_start:
                first = max(0, found - 5)
                excerpt(f"first {around!r}", first, log[first : min(found + 30, tail_start)])
        excerpt("the end of the log", tail_start, log[tail_start:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the whole process group (workers, reloader children) by its pid."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)


#: The port the README's commands listen on, replaced by a free one in tests.
DOCUMENTED_PORT = "8000"
#: What a command in the README starts with.
_COMMAND_NAMES = ("curl", "flask", "gunicorn", "pip", "python", "twist", "waitress-serve")


def documented_commands(section: str | None = None) -> list[str]:
    """The commands in the literal blocks of the README section titled ``section``, or of
    the README and every page of the docs, as written (each once, in order of appearance)."""
    if section is None:
        documents = [REPO / "README.rst", *sorted((REPO / "docs").rglob("*.rst"))]
        lines = [line for document in documents for line in document.read_text().splitlines()]
    else:
        lines = (REPO / "README.rst").read_text().splitlines()
        start = lines.index(section) + 2
        end = next(
            (
                i
                for i in range(start, len(lines) - 1)
                if lines[i + 1][:1] in ("-", "~", "=")
                and set(lines[i + 1]) <= set("-~=")
                and len(lines[i + 1]) == len(lines[i])
            ),
            len(lines),
        )
        lines = lines[start:end]
    commands = [
        line.strip()
        for line in lines
        if line.startswith("    ") and line.split(None, 1)[0] in _COMMAND_NAMES
    ]
    return list(dict.fromkeys(commands))


def as_written(command: str) -> list[str]:
    """A README command's arguments, its port left for :func:`start_server` to fill in."""
    return [
        part.replace("{", "{{").replace("}", "}}").replace(DOCUMENTED_PORT, "{port}")
        for part in shlex.split(command)
    ]


def start_server(
    command: list[str],
    db_uri: str,
    log: Path,
    cwd: Path = REPO,
    port: int = 0,
    *,
    pythonpath: bool = True,
    ready: str = "/api/notes",
    environment: dict[str, str] | None = None,
):
    """Start ``command`` (``{port}`` filled in) and wait until ``ready`` answers 200.

    :param pythonpath: put ``cwd`` on ``PYTHONPATH``; without it the command
        runs as a user would type it, with this Python's scripts first on ``PATH``.
    :param environment: more environment variables (``{port}`` filled in).
    """
    port = port or free_port()
    # PYTHONFAULTHANDLER: a server that crashes (SIGSEGV, SIGABRT...) writes
    # every thread's Python traceback into its log before it dies.
    env = {
        **os.environ,
        "EXAMPLE_APP_DB": db_uri,
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
    }
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    env.update({name: value.format(port=port) for name, value in (environment or {}).items()})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)
    command = [part.format(port=port, python=sys.executable) for part in command]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log, command)
    deadline = time.monotonic() + TIMEOUT
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server did not start:\n{server.report()}")
        if request(server.base_url + ready)[0] == 200:
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(
                f"the server did not answer in {TIMEOUT}s, so it was stopped:\n{server.report()}"
            )
        time.sleep(0.2)


def request(url: str, data: dict | None = None) -> tuple[int | None, object]:
    """``(status, JSON body)``; the body is None when it was cut off (a server
    restarting), and the status too when no status came."""
    body = json.dumps(data).encode() if data is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, body, headers), timeout=TIMEOUT
        ) as response:
            try:
                return response.status, json.load(response)
            except (http.client.HTTPException, OSError, ValueError):
                return response.status, None
    except urllib.error.HTTPError as error:
        return error.code, None
    except (http.client.HTTPException, OSError, ValueError) as error:
        return None, error


@dataclass
class Score:
    """What clients asked to write and what they were told."""

    saved: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    unanswered: set[str] = field(default_factory=set)
    read_failures: int = 0

    def check_against(self, committed: list[str]) -> None:
        """Every 2xx write is committed, no refused one is, and nothing else is."""
        in_db = set(committed)
        assert len(committed) == len(in_db), "a note was written twice"
        assert self.saved <= in_db, f"lost: {sorted(self.saved - in_db)}"
        assert not self.refused & in_db, f"refused yet saved: {sorted(self.refused & in_db)}"
        assert in_db - self.saved <= self.unanswered, "saved notes nobody asked for"


def exercise(
    base_url: str, clients: int = 4, writes: int = 10, during=None, prefix: str = "client"
) -> Score:
    """Concurrent clients create notes (every fourth one invalid) and read them back.

    ``during(score)``, if given, runs in its own thread alongside the clients.
    """
    score = Score()

    def client(number: int) -> None:
        for index in range(writes):
            valid = index % 4 != 3
            body = f"{prefix} {number} note {index}" + ("" if valid else " " + "x" * 500)
            status, _ = request(base_url + "/api/notes", {"body": body})
            if status is None:
                score.unanswered.add(body)
            elif 200 <= status < 300:
                score.saved.add(body)
            else:
                score.refused.add(body)
                assert status == 400 and not valid, f"{status} for {body[:30]!r}"
            status, notes = request(base_url + "/api/notes")
            if status != 200 or notes is None:
                score.read_failures += 1

    with ThreadPoolExecutor(clients + 1) as pool:
        background = pool.submit(during, score) if during else None
        for outcome in [pool.submit(client, n) for n in range(clients)]:
            outcome.result()
        if background:
            background.result()
    return score
