"""Sphinx configuration of torchlamb's API reference: ``make docs`` builds it into ``_build/html``.

Everything it needs is installed with the package's ``docs`` extra; the build downloads nothing.
"""

import sys
from pathlib import Path

# Document the checkout's sources, whether or not the package is installed (editable installs point here anyway).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torchlamb  # noqa: E402

project = "torchlamb"
author = "torchlamb contributors"
copyright = "torchlamb contributors"
release = version = torchlamb.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
exclude_patterns = ["_build"]

# The docstrings are Google style (Args:, Attributes:, Example::).
napoleon_google_docstring = True
napoleon_numpy_docstring = False

autodoc_member_order = "bysource"
autodoc_typehints_format = "short"

# Without intersphinx (it would download torch's inventory) names from torch and the standard library cannot be
# linked; nitpicky mode still checks every reference to torchlamb's own names.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|collections|typing|pathlib|numpy|datetime)(\..*)?"),
]

html_theme = "alabaster"
html_title = f"torchlamb {release}"
