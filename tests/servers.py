"""Real servers in their own processes, and HTTP clients that keep score."""

from __future__ import annotations

import http.client
import json
import os
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A server process started in its own process group, and its output."""

    process: subprocess.Popen
    base_url: str
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the whole process group (workers, reloader children) by its pid."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)


def start_server(command: list[str], db_uri: str, log: Path, cwd: Path = REPO, port: int = 0):
    """Start ``command`` (``{port}`` filled in) and wait until it answers."""
    port = port or free_port()
    env = {**os.environ, "EXAMPLE_APP_DB": db_uri, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    with log.open("wb") as output:
        process = subprocess.Popen(
            [part.format(port=port, python=sys.executable) for part in command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + TIMEOUT
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"{command[:3]} exited with {process.returncode}:\n{server.output}"
            )
        if request(server.base_url + "/api/notes")[0] == 200:
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"{command[:3]} did not answer in {TIMEOUT}s:\n{server.output}")
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
