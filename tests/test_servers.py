"""The example app under real servers, each in its own process, over real sockets.

Every server runs the same scenario: concurrent clients write notes (some
invalid) and read them back; afterwards every write that got a 2xx is in the
database and no refused one is.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.servers import (
    DOCUMENTED_PORT,
    REPO,
    Server,
    as_written,
    documented_commands,
    exercise,
    request,
    start_server,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

THREAD_ERRORS = ("created in a thread", "WrongThreadError", "registered with another thread")


def check_output(server: Server, errors: tuple[str, ...] = (*THREAD_ERRORS, "Traceback")) -> None:
    """No ``errors`` in the server's log; a failure shows where, and the log's tail."""
    output = server.output
    for error in errors:
        assert error not in output, server.report(around=error)


#: Every command the README and the docs show, each run below as written (from
#: the checkout, without PYTHONPATH; its port 8000 replaced by a free one).
DOCUMENTED = documented_commands()
SERVERS = [command for command in DOCUMENTED if "example_app.wsgi" in command]
DEV_SERVER = [command for command in DOCUMENTED if command.startswith("python -m example_app ")]
PASTE = [command for command in DOCUMENTED if "paste.deploy" in command]
FLASK = [command for command in DOCUMENTED if command.startswith("flask ")]
FIRST_APP = [command for command in DOCUMENTED if "docs/first_app.py" in command]
CURL = [command for command in DOCUMENTED if command.startswith("curl ")]
SPHINX = [command for command in DOCUMENTED if command.startswith("python -m sphinx ")]
#: "pip install ... && python -m example_app": what runs once installed.
QUICK_START = [
    command.split(" && ", 1)[1]
    for command in DOCUMENTED
    if command.startswith("pip install ") and " && python -m example_app" in command
]


def test_every_documented_command_is_run_by_a_test():
    run = {*SERVERS, *DEV_SERVER, *PASTE, *FLASK, *FIRST_APP, *CURL, *SPHINX}  # tests/test_docs.py
    # pip's: the install commands run in tests/test_install.py; the test command,
    # which .ci/run runs (tests/test_readme.py); and the example's, whose pip part
    # is the first install command and whose server is run below.
    installs = set(documented_commands("Install"))
    tests = {c for c in DOCUMENTED if c.startswith("pip install ") and c.endswith(" && pytest")}
    quick_start = {c for c in DOCUMENTED if c.endswith(" && python -m example_app")}
    assert QUICK_START == ["python -m example_app"] and len(tests) == 1
    assert [c for c in DOCUMENTED if c not in run | installs | tests | quick_start] == []


def test_the_readmes_first_command_serves_the_example_on_sqlite(tmp_path):
    copy_of_example_app(tmp_path)  # its SQLite file goes to instance/ in the current directory
    [command] = QUICK_START
    server = start_server(
        as_written(command), "", tmp_path / "server.log", cwd=tmp_path, pythonpath=False,
        environment={"PORT": "{port}"},
    )  # fmt: skip
    try:
        score = exercise(server.base_url, clients=2, writes=8)
    finally:
        server.stop()

    assert not score.unanswered, server.report()
    assert len(score.saved) == 2 * 6 and len(score.refused) == 2 * 2
    with sqlite3.connect(tmp_path / "instance" / "notes.db") as side_door:
        score.check_against([body for (body,) in side_door.execute("SELECT body FROM note")])
    assert "Restarting with" in server.output  # the reloader is on


def test_the_docs_document_every_production_server():
    assert sorted(command.split()[:3] for command in SERVERS) == [
        ["gunicorn", "-k", "gthread"],
        ["gunicorn", "-k", "gthread"],
        ["gunicorn", "-k", "sync"],  # sync workers serve in the thread that imported the app
        ["python", "-m", "twisted"],
        ["waitress-serve", "--listen", "127.0.0.1:8000"],
    ]


@pytest.mark.parametrize("command", SERVERS + DEV_SERVER)
def test_a_production_server_keeps_every_acknowledged_write(command, empty_db, tmp_path):
    server = start_server(
        as_written(command), empty_db.uri, tmp_path / "server.log", pythonpath=False
    )
    try:
        score = exercise(server.base_url, clients=4, writes=12)
    finally:
        server.stop()

    assert not score.unanswered and not score.read_failures, (
        f"unanswered: {sorted(score.unanswered)}, failed reads: {score.read_failures}\n"
        + server.report()
    )
    assert len(score.saved) == 4 * 9 and len(score.refused) == 4 * 3
    score.check_against(empty_db.notes())
    check_output(server)


# The reloader's child reloads by sys.exit(3) from its main thread while its
# server thread (a daemon) may be starting a request thread. Before 3.11.6
# CPython could start a thread whose state the exiting interpreter had freed,
# and die of SIGSEGV in thread_run()/_PyThreadState_SetCurrent() (gh-108987);
# Debian 12's python3.11 is 3.11.2.
KNOWN_CRASH = (
    ""
    if sys.version_info >= (3, 11, 6)
    else f" (a child that died of SIGSEGV on reload is CPython gh-108987 in this Python,"
    f" {sys.version.split()[0]}; fixed in 3.11.6)"
)


def test_the_dev_server_keeps_serving_through_a_reload(empty_db, tmp_path):
    app_copy = tmp_path / "example_app"
    shutil.copytree(REPO / "example_app", app_copy, ignore=shutil.ignore_patterns("__pycache__"))
    command = ["{python}", "-m", "example_app", "--db", empty_db.uri, "--port", "{port}"]
    server = start_server(command, empty_db.uri, tmp_path / "server.log", cwd=tmp_path)

    def reload_midway(score) -> None:
        deadline = time.monotonic() + 30
        while len(score.saved) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        later = time.time() + 5
        os.utime(app_copy / "models.py", (later, later))
        while server.output.count("Restarting with") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        score = exercise(server.base_url, clients=4, writes=30, during=reload_midway)
        after_reload = exercise(server.base_url, clients=2, writes=4, prefix="after")
        # The reloader's parent exits when its child ends with anything but 3
        # (a reload): a child that crashed takes the whole dev server down.
        assert server.process.poll() is None, (
            f"the dev server died{KNOWN_CRASH}:\n{server.report()}"
        )
    finally:
        server.stop()

    output = server.output
    assert output.count("Restarting with") == 2, server.report()  # start, then reload
    assert "models.py" in output, server.report()
    assert len(after_reload.saved) == 2 * 3 and not after_reload.unanswered, server.report()
    assert len(score.unanswered) <= 4, score.unanswered  # at most the requests cut by the reload
    score.check_against([n for n in empty_db.notes() if n not in after_reload.saved])
    check_output(server, THREAD_ERRORS)


# A dev server whose reloader child crashes after a long log: the parent
# exits with the child's return code, as werkzeug's reloader does (-11 is 245),
# here after a few more lines, so that the crash is no longer in the tail.
CRASHING_SERVER = """
import ctypes, subprocess, sys
if len(sys.argv) == 1:
    code = subprocess.call([sys.executable, __file__, "child"])
    for number in range(80):
        print("parent line", number)
    sys.exit(code)
for number in range(500):
    print("child line", number)
ctypes.string_at(0)
"""


def test_a_crashed_server_is_reported_by_its_return_code_dump_and_tail(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_SERVER)
    with pytest.raises(AssertionError) as failure:
        start_server(["{python}", str(script)], "", tmp_path / "server.log", cwd=tmp_path)

    report = str(failure.value)
    assert "exited with 245" in report and "SIGSEGV" in report
    assert "Fatal Python error: Segmentation fault" in report
    assert 'crash.py", line 10 in <module>' in report  # the crashing line, from the dump
    assert "parent line 79" in report and "parent line 19\n" not in report
    assert "child line 499" not in report
    assert len(report.splitlines()) < 80


def copy_of_example_app(tmp_path) -> None:
    shutil.copytree(
        REPO / "example_app", tmp_path / "example_app", ignore=shutil.ignore_patterns("__pycache__")
    )


def test_the_documented_paste_deploy_command_serves_the_app(tmp_path):
    copy_of_example_app(tmp_path)  # its SQLite file goes to instance/ in the current directory
    [command] = PASTE
    server = start_server(
        as_written(command), "", tmp_path / "server.log", cwd=tmp_path, pythonpath=False
    )
    try:
        created = request(server.base_url + "/api/notes", {"body": "via paste"})
        listed = request(server.base_url + "/api/notes")
    finally:
        server.stop()

    assert created[0] == 201 and [note["body"] for note in listed[1]] == ["via paste"]
    assert (tmp_path / "instance" / "notes.db").exists()
    assert "Serving on http://127.0.0.1:" in server.output, server.report()


def test_the_documented_flask_command_serves_the_flask_example(empty_db, tmp_path):
    [command] = FLASK
    server = start_server(
        as_written(command), empty_db.uri, tmp_path / "server.log", pythonpath=False, ready="/notes"
    )
    try:
        created = post_form(server.base_url + "/notes", {"body": "via flask"})
    finally:
        server.stop()

    assert created == 201
    assert empty_db.notes() == ["via flask"]


def post_form(url: str, fields: dict[str, str]) -> int:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data), timeout=30) as response:
        return response.status


def test_the_first_application_of_the_docs_saves_and_lists_notes(tmp_path):
    (tmp_path / "docs").mkdir()  # its SQLite file goes to the current directory
    shutil.copy(REPO / "docs" / "first_app.py", tmp_path / "docs" / "first_app.py")
    [command] = FIRST_APP
    server = start_server(
        as_written(command), "", tmp_path / "server.log", cwd=tmp_path, pythonpath=False, ready="/"
    )
    port = server.base_url.rsplit(":", 1)[1]
    try:
        answers = [
            subprocess.run(
                shlex.split(curl.replace(DOCUMENTED_PORT, port)),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            for curl in CURL
        ]
    finally:
        server.stop()

    assert answers == ["saved\n", "hello\n"]
