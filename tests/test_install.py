"""The README's install commands, run as written in a new virtual environment."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import REPO, documented_commands

INSTALL = documented_commands("Install")


def test_the_readme_names_an_install_command_per_extra_it_promises():
    assert [command.split("#")[0].split()[-1] for command in INSTALL] == [
        ".",
        "'.[postgres]'",
        "'.[twisted]'",
        "'.[example]'",
    ]


def test_the_install_commands_give_what_their_comments_say(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)

    for command in INSTALL:
        result = subprocess.run(
            ["bash", "-c", f". {venv}/bin/activate && {command}"],
            cwd=REPO, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"

    imports = "import middlestorm, psycopg2, twisted, flask, gunicorn, waitress, paste.deploy"
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", f"{imports}; print(middlestorm.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == str(REPO / "middlestorm" / "__init__.py")  # the checkout's
