"""The damping rules on the noisy quadratic: family sweep and a small score check."""

import numpy as np
import pandas as pd
import pytest

from experiments.optimizer_benchmark import quadratic
from experiments.problems.noisy_quadratic import NoisyQuadratic, make_damping, run


def test_family_sweep_end_to_end(tmp_path):
    argv = ["--seeds", "2", "--members", "gaussian", "init=10", "--no-progress",
            "--no-plot", "--out", str(tmp_path)]  # fmt: skip
    summary = quadratic.main(argv)
    assert list(summary["member"].drop_duplicates()) == ["gaussian", "init=10"]
    methods = set(summary["method"])
    assert set(quadratic.FAMILY_RULES) <= methods
    best = summary[summary["method"].str.startswith("constant_")]
    assert (best["ratio_to_best_constant"] == 1.0).all()
    assert np.isfinite(summary["ratio_to_best_constant"]).all()
    runs = pd.read_csv(tmp_path / "quadratic_family.csv")
    assert len(runs) == 2 * 2 * (len(quadratic.FAMILY_DAMPINGS) + 4)
    # resume: the tables are reused, the summary is the same
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "tables").glob("*.csv")}
    pd.testing.assert_frame_equal(quadratic.main(argv), summary)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_family_rejects_unknown_member(tmp_path):
    with pytest.raises(SystemExit):
        quadratic.main(["--members", "nope", "--out", str(tmp_path)])


def test_unknown_optimizer_name_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'bootstrap_x'"):
        make_damping("bootstrap_x", 0, 61)


def test_default_bootstrap_beats_the_tuned_constant_on_a_small_quadratic():
    """Median final distance over seeds, vs the best of a constant grid."""
    problem = NoisyQuadratic(dim=5, batch_size=64, gamma_var=2e3)
    seeds = range(16)

    def median(name):
        return np.median([run(problem, name, s, 20)["distance"].iloc[-1]
                          for s in seeds])  # fmt: skip

    best = min(median(f"constant_{d:.3g}") for d in [1.0, 1.78, 3.16, 5.62, 10.0])
    assert median("bootstrap") < best
