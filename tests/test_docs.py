"""The documentation builds without a warning, and its examples run."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.servers import REPO, documented_commands


@pytest.fixture(scope="module")
def sphinx() -> None:
    problem = None
    if shutil.which("dot") is None:
        problem = "Graphviz's dot is not installed (apt-get install graphviz)"
    try:
        import sphinx  # noqa: F401
    except ImportError:
        problem = "Sphinx is not installed (pip install -e '.[docs]')"
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem}; CI must build the docs")
        pytest.skip(problem)


def build(builder: str, output) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
         str(REPO / "docs"), str(output)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_the_readmes_docs_command_builds_them_with_no_warning(sphinx):
    [command] = [c for c in documented_commands() if c.startswith("python -m sphinx ")]
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    result = subprocess.run(
        shlex.split(command), capture_output=True, text=True, timeout=300, cwd=REPO,
        env=environment,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert (REPO / "docs" / "_build" / "html" / "deploy" / "pgbouncer.html").exists()


def test_the_docs_examples_run_as_doctests(sphinx, tmp_path):
    result = build("doctest", tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failures in tests" in (tmp_path / "output.txt").read_text()


def test_the_readme_renders_with_no_warning():
    import docutils.core
    from docutils.writers.null import Writer

    warnings = io.StringIO()
    docutils.core.publish_string(
        (REPO / "README.rst").read_text(),
        writer=Writer(),
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": warnings},
    )

    assert warnings.getvalue() == ""
