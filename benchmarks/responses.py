"""What middlestorm costs large responses: memory for a HEAD, time for a file download.

* ``head``: peak RSS of a process answering one HEAD request whose app streams
  a large generated body, bare and wrapped (each case in a fresh process).
* ``download``: seconds to download a large file that the app returns through
  the server's ``wsgi.file_wrapper``, bare and wrapped, under real servers
  (gunicorn's sync worker uses ``sendfile()``, waitress its file buffer);
  cases interleaved round by round, medians and same-round ratios to bare.

    python benchmarks/responses.py head --mib 200
    python benchmarks/responses.py download --mib 200 --rounds 5

Run it from a checkout; ``PYTHONPATH`` picks the middlestorm to measure.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHUNK = 1024 * 1024
#: The block size werkzeug's ``wrap_file`` and wsgiref's ``FileWrapper`` use.
FILE_BLOCK = 8192

SERVERS = {
    "gunicorn sync": [
        sys.executable, "-m", "gunicorn", "-k", "sync", "-w", "1",
        "-b", "127.0.0.1:{port}", "benchmarks.responses:{app}",
    ],
    "waitress": [
        sys.executable, "-m", "waitress", "--listen", "127.0.0.1:{port}", "--threads", "1",
        "benchmarks.responses:{app}",
    ],
}  # fmt: skip


def download_app(environ, start_response):
    """Send ``$DOWNLOAD_FILE`` through the server's file wrapper."""
    path = os.environ["DOWNLOAD_FILE"]
    size = str(os.path.getsize(path))
    start_response(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", size)]
    )
    return environ["wsgi.file_wrapper"](open(path, "rb"), FILE_BLOCK)


def wrapped_download_app(environ, start_response):
    return _wrapped()(environ, start_response)


_middleware = None


def _wrapped():
    global _middleware
    if _middleware is None:
        from middlestorm import MiddleStorm

        _middleware = MiddleStorm(download_app, "sqlite:")
    return _middleware


def head_case(wrapped: bool, mib: int) -> int:
    """Answer one HEAD over a streamed body of ``mib`` MiB; return the peak RSS in KiB."""
    from werkzeug.test import EnvironBuilder

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (b"x" * CHUNK for _ in range(mib))

    if wrapped:
        from middlestorm import MiddleStorm

        app = MiddleStorm(app, "sqlite:")
    environ = EnvironBuilder(method="HEAD").get_environ()
    result = app(environ, lambda status, headers, exc_info=None: None)
    for _ in result:
        pass
    getattr(result, "close", lambda: None)()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(server: str, app: str, file: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [part.format(port=port, app=app) for part in SERVERS[server]]
    env = {**os.environ, "DOWNLOAD_FILE": str(file)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, url
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"{server} did not start") from None
            time.sleep(0.1)


def download_seconds(url: str, size: int) -> float:
    started = time.perf_counter()
    received = 0
    with urllib.request.urlopen(url, timeout=120) as response:
        while chunk := response.read(CHUNK):
            received += len(chunk)
    elapsed = time.perf_counter() - started
    if received != size:
        raise SystemExit(f"received {received} of {size} bytes from {url}")
    return elapsed


def run_head(options: argparse.Namespace) -> None:
    print(f"HEAD over a streamed {options.mib} MiB body: peak RSS of the process")
    for label, wrapped in (("bare", False), ("middlestorm", True)):
        output = subprocess.run(
            [sys.executable, __file__, "head-case", "--mib", str(options.mib)]
            + (["--wrapped"] if wrapped else []),
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        print(f"  {label:12} {int(output) / 1024:8.1f} MiB")


def run_download(options: argparse.Namespace) -> None:
    with tempfile.NamedTemporaryFile(suffix=".bin") as file:
        for _ in range(options.mib):
            file.write(os.urandom(CHUNK))
        file.flush()
        size = options.mib * CHUNK
        print(f"download of a {options.mib} MiB file through wsgi.file_wrapper, "
              f"{options.rounds} interleaved rounds")  # fmt: skip
        for server in SERVERS:
            processes = {}
            try:
                for label, app in (("bare", "download_app"), ("wrapped", "wrapped_download_app")):
                    processes[label] = serve(server, app, Path(file.name))
                for _, url in processes.values():
                    download_seconds(url, size)  # warm up
                times: dict[str, list[float]] = {label: [] for label in processes}
                for round_ in range(options.rounds):
                    order = list(processes) if round_ % 2 == 0 else list(reversed(processes))
                    for label in order:
                        times[label].append(download_seconds(processes[label][1], size))
            finally:
                for process, _ in processes.values():
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(30)
            ratios = [w / b for w, b in zip(times["wrapped"], times["bare"], strict=True)]
            print(
                f"  {server:14} bare {statistics.median(times['bare']):6.3f} s  "
                f"middlestorm {statistics.median(times['wrapped']):6.3f} s  "
                f"ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["head", "download", "head-case"])
    parser.add_argument("--mib", type=int, default=200, help="the body's size (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="download rounds (default 5)")
    parser.add_argument("--wrapped", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.what == "head-case":
        print(head_case(options.wrapped, options.mib))
    elif options.what == "head":
        run_head(options)
    else:
        run_download(options)


if __name__ == "__main__":
    main()
