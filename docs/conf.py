"""Sphinx configuration of neuroar's documentation: `make docs` (or tests/test_docs.py, warnings as errors)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))  # neuroar_docs: tables generated from the schema, the cohort and the results
sys.path.insert(0, str(HERE.parent / "src"))  # the package itself, for autodoc, when it is not installed

from neuroar import __version__  # noqa: E402

project = "neuroar"
author = "The neuroar developers"
copyright = "The neuroar developers, Apache License 2.0"
version = release = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.viewcode", "neuroar_docs"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
default_role = "literal"  # `x` in docstrings is code, as it is in Markdown

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # torch.nn.Module.forward's docstring is not ours
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "furo"
html_title = f"neuroar {version}"
html_static_path = []
