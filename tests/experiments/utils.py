"""Helpers shared by the study tests."""

import numpy as np
import pandas as pd
import pytest


def tiny_training(
    problem: str = "digits_logreg", steps: str = "0,11", eval_batch: int = 16
) -> list[str]:
    """Command line of the tiny training run the curvature-study tests share.

    Half an epoch of ``problem`` at batch size 64 (11 steps on digits), checkpoints
    at ``steps``, a held-out batch of ``eval_batch`` samples, no progress bars.
    """
    return [
        *("--problem", problem, "--epochs", "0.5", "--batch-size", "64"),
        *("--steps", steps, "--eval-batch-size", str(eval_batch), "--no-progress"),
    ]


class Interrupt(Exception):
    """Raised to simulate a killed run."""


def interrupt_on_call(monkeypatch, module, name, call):
    """Make ``module.name`` raise :class:`Interrupt` on its ``call``-th call."""
    original = getattr(module, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return original


def assert_resumes(monkeypatch, main, argv, tmp_path, module, name, call=2):
    """Run ``main`` once uninterrupted and once interrupted then resumed; compare.

    Returns:
        The table of the uninterrupted run.

    """
    reference = pd.read_csv(main([*argv, "--out", str(tmp_path / "ref")])["table"])
    original = interrupt_on_call(monkeypatch, module, name, call)
    with pytest.raises(Interrupt):
        main([*argv, "--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(module, name, original)
    resumed = pd.read_csv(main([*argv, "--out", str(tmp_path / "resumed")])["table"])
    pd.testing.assert_frame_equal(reference, resumed)
    return reference


def assert_finite(table, columns):
    """All ``columns`` present and finite."""
    missing = set(columns) - set(table.columns)
    assert not missing, f"missing columns {missing}"
    values = table[list(columns)].to_numpy(dtype=float)
    assert np.isfinite(values).all()
