"""The documentation: supported-layers page against the extension tables, -W build.

(a) Every module class in ``docs/supported_layers.rst`` must be in the table of
    square-root-GGN rules that :class:`vivitlib.LowRankGGN` installs (BackPACK's
    ``SqrtGGN`` table plus vivitlib's own rules), and vice versa; the page's
    "factored" rows must be vivitlib's factored handlers, its parameterized rows
    must have per-sample-gradient rules, and its losses must be losses.
(b) The Sphinx build passes with warnings as errors (skipped without Sphinx).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.nn import Module
from torch.nn.modules.loss import _Loss

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
LAYERS_PAGE = DOCS / "supported_layers.rst"
BUILD_BUDGET_S = 60

# A list-table row whose first cell is a dotted class name, then its "V" cell.
_ROW = re.compile(r"^\s*\* - ``(?P<name>[A-Za-z_][\w.]*)``\s*$")
_CELL = re.compile(r"^\s+- ?(?P<text>.*)$")
_KINDS = ("factored", "factored when cheaper", "dense", "no parameters", "loss")


def _documented() -> dict[type, str]:
    """``{module class: V cell}`` for every table row of the supported-layers page."""
    lines = LAYERS_PAGE.read_text(encoding="utf-8").splitlines()
    rows: dict[type, str] = {}
    for i, line in enumerate(lines):
        match = _ROW.match(line)
        if not match:
            continue
        name = match["name"]
        cell = _CELL.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert cell, f"supported_layers.rst: row {name} has no V column."
        kind = cell["text"].strip()
        assert kind in _KINDS, f"supported_layers.rst: {name} has V={kind!r}."
        cls = _resolve(name)
        assert cls not in rows, f"supported_layers.rst lists {name} twice."
        rows[cls] = kind
    assert rows, "supported_layers.rst has no table rows; did the format change?"
    return rows


def _resolve(dotted: str) -> type:
    module_name, _, attr = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise AssertionError(f"supported_layers.rst: cannot import {dotted}") from err
    assert isinstance(cls, type) and issubclass(cls, Module), dotted
    return cls


def _module_table(extension) -> dict[type, object]:
    """BackPACK keeps its module -> rule table in a name-mangled private dict."""
    for name, value in vars(extension).items():
        if name.endswith("__module_extensions") and isinstance(value, dict):
            return dict(value)
    raise AssertionError(f"No module table found on {type(extension).__name__}.")


class _Owner:
    def run_extension(self, call, module, g_inp, g_out):  # pragma: no cover
        call(module, g_inp, g_out)


@pytest.fixture(scope="module")
def tables():
    from backpack.extensions.secondorder.sqrt_ggn import SqrtGGNExact

    from vivitlib.extensions.backpack_ext import (
        BatchGradsExtension,
        GGNFactorExtension,
    )

    return {
        "ours": _module_table(GGNFactorExtension(_Owner(), 0, None)),
        "ours_mc": _module_table(GGNFactorExtension(_Owner(), 1, None)),
        "grads": _module_table(BatchGradsExtension(_Owner(), None)),
        "backpack": _module_table(SqrtGGNExact()),
    }


def _names(classes) -> list[str]:
    return sorted(f"{c.__module__}.{c.__qualname__}" for c in classes)


def test_supported_layers_page_matches_extension_table(tables):
    documented = _documented()
    ours = tables["ours"]
    missing = set(ours) - set(documented)
    extra = set(documented) - set(ours)
    assert not missing, f"Supported but not in supported_layers.rst: {_names(missing)}"
    assert not extra, f"In supported_layers.rst but unsupported: {_names(extra)}"
    assert set(tables["ours_mc"]) == set(ours), "MC and exact tables differ."


def test_backpack_rules_are_all_kept(tables):
    dropped = set(tables["backpack"]) - set(tables["ours"])
    assert not dropped, f"BackPACK SqrtGGN rules missing in ours: {_names(dropped)}"


def test_factored_rows_match_factored_handlers(tables):
    from vivitlib.extensions.backpack_ext import FACTORED_GRADS, FACTORED_SQRT

    documented = _documented()
    factored = {c for c, kind in documented.items() if kind.startswith("factored")}
    assert factored == set(FACTORED_SQRT), (
        f"Rows marked factored {_names(factored)} != factored handlers "
        f"{_names(FACTORED_SQRT)}"
    )
    assert set(FACTORED_GRADS) == set(FACTORED_SQRT)
    for cls in factored:
        assert type(tables["ours"][cls]) is FACTORED_SQRT[cls]


def test_parameter_and_loss_rows_are_consistent(tables):
    grads = tables["grads"]
    for cls, kind in _documented().items():
        name = _names([cls])[0]
        if kind == "loss":
            assert issubclass(cls, _Loss), f"{name} is marked loss but is not one."
        else:
            assert not issubclass(cls, _Loss), f"{name} is a loss, mark it 'loss'."
        has_params = kind in ("factored", "factored when cheaper", "dense")
        assert (cls in grads) == has_params, (
            f"{name}: V={kind!r}, but per-sample-gradient rule "
            f"{'present' if cls in grads else 'absent'}."
        )


@pytest.mark.slow  # end to end; runs in the full suite (CI), not in `make test`
@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None, reason="Sphinx is not installed"
)
def test_docs_build_without_warnings(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIVITLIB_DOCS_ONLINE": "0"}
    cmd = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
        "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html"),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        result = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=2 * BUILD_BUDGET_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"Sphinx build took over {2 * BUILD_BUDGET_S} s.")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, f"Sphinx -W failed:\n{result.stderr[-4000:]}"
    assert (tmp_path / "html" / "index.html").is_file()
    assert elapsed < BUILD_BUDGET_S, f"Sphinx build took {elapsed:.0f} s."
