"""Sphinx configuration: ``sphinx-build -W docs docs/_build/html`` (tests/test_docs.py runs it)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "middlestorm"
author = "middlestorm maintainers"
copyright = "middlestorm maintainers"
release = version = __import__("middlestorm").__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.graphviz",
]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
graphviz_output_format = "svg"
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures show them; forward references stay as written
autodoc_default_options = {"members": True}
# Storm, transaction and Twisted document their own classes.
suppress_warnings = ["ref.python"]

# Docstring examples (>>>) are doctests too, run with the package's names.
doctest_global_setup = "from middlestorm import *"
