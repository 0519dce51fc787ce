"""Server processes on 127.0.0.1: started in a session of their own, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
#: The folder holding the ``benchmarks`` package, put on the servers' ``PYTHONPATH``.
CHECKOUT = Path(__file__).resolve().parent.parent
APP = "benchmarks.contenders:served"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def server_command(kind: str, port: int, threads: int, workers: int) -> list[str]:
    """The command line of a ``waitress``, ``gunicorn`` (gthread) or ``werkzeug`` server."""
    python = sys.executable
    if kind == "waitress":
        return [python, "-m", "waitress", f"--listen={HOST}:{port}", f"--threads={threads}", APP]
    if kind == "gunicorn":
        return [
            python, "-m", "gunicorn", "-k", "gthread", "--threads", str(threads),
            "-w", str(workers), "-b", f"{HOST}:{port}", "--log-level", "warning", APP,
        ]  # fmt: skip
    if kind == "werkzeug":
        return [python, "-m", "benchmarks.werkzeug_server", HOST, str(port)]
    raise ValueError(f"unknown server {kind!r}")


@dataclass
class Server:
    """A running server: its process, its base URL and the file its output goes to."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        """SIGTERM to the server's process group (its pid), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)
            except ProcessLookupError:
                pass

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()


def start(command: Sequence[str], environment: Mapping[str, str], port: int) -> Server:
    """Start a server and wait until it answers on ``port``."""
    env = {**os.environ, **environment}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    log = Path(tempfile.mkstemp(prefix="middlestorm-bench-server-", suffix=".log")[1])
    with log.open("wb") as output:
        process = subprocess.Popen(
            list(command), env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=CHECKOUT,
        )  # fmt: skip
    server = Server(process, f"http://{HOST}:{port}", log)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.get("/_bench/stats")
            return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{command[2]} did not start; its output: {log}") from None
            time.sleep(0.1)


@contextmanager
def servers(
    specs: Mapping[str, tuple[list[str], dict[str, str], int]],
) -> Iterator[dict[str, Server]]:
    """Start each named ``(command, environment, port)``; stop all of them on the way out.

    Their output goes to temporary files, removed unless something failed."""
    with ExitStack() as stack:
        started = {}
        for name, (command, environment, port) in specs.items():
            server = start(command, environment, port)
            stack.callback(server.stop)
            started[name] = server
        yield started
    for server in started.values():  # kept when something failed, for a look
        server.log.unlink(missing_ok=True)
