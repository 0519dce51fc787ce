"""The README stays true: its quickstart runs and CI runs its test command."""

from __future__ import annotations

import re
import textwrap

from werkzeug.test import Client

from tests.servers import REPO

README = (REPO / "README.rst").read_text()


def test_ci_runs_the_test_command_the_readme_gives():
    command = re.search(r"Run the tests::\n\n    (.+)\n", README).group(1)

    assert command in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_quickstart_commits_a_note_before_its_201(db):
    code = re.search(r"Quickstart\n-+\n\n\.\. code-block:: python\n\n(.+?)\n\n\S", README, re.S)
    source = textwrap.dedent(code.group(1)).replace("from myapp.models", "from tests.models")
    source = source.replace('"postgres://app@localhost/app"', repr(db.uri))
    namespace: dict = {}
    exec(source, namespace)
    app = namespace["app"]
    try:
        response = Client(app).post("/", data={"body": "quick"}, buffered=True)
    finally:
        app.registry.release()

    assert (response.status_code, response.text) == (201, "saved")
    assert db.notes() == ["quick"]
