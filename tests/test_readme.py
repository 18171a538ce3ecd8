"""The README's usage snippets run as written (examples are tests)."""

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    block = namespace["block"]
    assert block.evals.shape[0] == block.gammas.shape[1] > 0
    assert [s.shape for s in namespace["step"]] == [
        p.shape for p in namespace["model"].parameters()
    ]
    assert namespace["evals"].shape == (5,)


def test_make_targets_run_existing_modules():
    """Every ``python -m <module>`` in the Makefile names an importable module."""
    import importlib.util

    makefile = (README.parent / "Makefile").read_text()
    modules = re.findall(r"\$\(PY\) -m ([\w.]+)", makefile)
    assert "experiments.noise_during_training.run" in modules
    for module in modules:
        if module in {"pip", "pytest", "sphinx", "ruff"}:
            continue
        assert importlib.util.find_spec(module) is not None, module
