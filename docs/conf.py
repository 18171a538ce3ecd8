"""Sphinx configuration for the vivitlib documentation.

Build (offline, warnings are errors)::

    .venv/bin/python -m sphinx -W -b html docs docs/_build/html

Cross-links into the Python, PyTorch, NumPy and SciPy docs (intersphinx) need
their ``objects.inv`` inventories. There is no network during ordinary builds,
so intersphinx is tolerant:

* an inventory saved as ``docs/_inventories/<name>.inv`` is always used;
* the online inventories are fetched only when ``VIVITLIB_DOCS_ONLINE=1``;
* otherwise the project is left out of the mapping, its references render as
  plain code, and the build stays warning-free.

With ``VIVITLIB_DOCS_ONLINE=1`` and a local copy, an unreachable server falls
back to the copy silently; without a local copy it is a warning (an error
under ``-W``), which is what one asks for by going online. To save an
inventory, download ``<url>/objects.inv`` (URLs in ``_INTERSPHINX`` below) to
``docs/_inventories/<name>.inv``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import vivitlib  # noqa: E402

# -- Project ----------------------------------------------------------------

project = "vivitlib"
author = "The vivitlib developers"
copyright = "2025, The vivitlib developers"  # noqa: A001
release = vivitlib.__version__
version = ".".join(release.split(".")[:2])

# -- General ----------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]
exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
language = "en"
pygments_style = "sphinx"
default_role = "code"  # `x` in prose renders as inline code, never a dangling ref

# -- autodoc / napoleon -----------------------------------------------------

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = True
autoclass_content = "both"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_attr_annotations = True

# -- intersphinx (offline-tolerant) -----------------------------------------

_INTERSPHINX = {
    "python": "https://docs.python.org/3",
    "torch": "https://docs.pytorch.org/docs/stable",
    "numpy": "https://numpy.org/doc/stable",
    "scipy": "https://docs.scipy.org/doc/scipy",
}
_ONLINE = os.environ.get("VIVITLIB_DOCS_ONLINE", "") == "1"


def _intersphinx_mapping() -> dict[str, tuple[str, tuple[str | None, ...]]]:
    """Inventory locations per project: online first (if asked), then local."""
    mapping = {}
    for name, url in _INTERSPHINX.items():
        local = DOCS / "_inventories" / f"{name}.inv"
        locations: list[str | None] = [None] if _ONLINE else []
        if local.is_file():
            locations.append(str(local))
        if locations:
            mapping[name] = (url, tuple(locations))
    return mapping


intersphinx_mapping = _intersphinx_mapping()
intersphinx_timeout = 10
# With no inventory, an external reference is simply left unresolved (not nitpicky).
nitpicky = False

# -- HTML -------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"vivitlib {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "GGN curvature and its mini-batch noise for PyTorch",
    "fixed_sidebar": True,
    "show_relbars": True,
}
html_show_sourcelink = False

# -- MathJax ----------------------------------------------------------------

mathjax3_config = {"tex": {"macros": {"R": r"\mathbb{R}"}}}

# -- Hooks ------------------------------------------------------------------

#: Result classes that users receive but never construct: their constructor
#: signature is internal, so the docs show the class name only.
_RESULT_CLASSES = {"vivitlib.GGNBlock", "vivitlib.block.GGNBlock"}


def _hide_internal_signature(app, what, name, obj, options, signature, ret):
    if what == "class" and name in _RESULT_CLASSES:
        return "", None
    return None


def setup(app):
    app.connect("autodoc-process-signature", _hide_internal_signature)
