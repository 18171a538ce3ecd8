"""Study 2 end to end in a tiny configuration, and its resume."""

import pandas as pd

import experiments.spectrum_approximations.run as study
from experiments.spectrum_approximations.compute import QUANTITIES
from tests.experiments.utils import assert_finite, assert_resumes, tiny_training

N, C, DRAWS = 16, 10, 3
ARGV = [*tiny_training("digits_mlp", eval_batch=N), "--draws", str(DRAWS)]


def test_spectra_table_distances_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "spectra_table", call=2
    )
    assert_finite(table, ["eigenvalue", "num_columns", "step", "draw"])
    bound = {"exact": N * (C - 1), "subsampled_1/8": (N // 8) * (C - 1), "mc_1": N}
    draws = {"exact": 1, "subsampled_1/8": DRAWS, "mc_1": DRAWS}
    for (step, method), rows in table.groupby(["step", "method"]):
        assert rows["draw"].nunique() == draws[method], (step, method)
        assert rows.groupby("draw").size().max() <= bound[method], (step, method)
        assert (rows["eigenvalue"] > 0).all()
    # the draws differ: new subsets, new MC samples
    mc = table[(table["method"] == "mc_1") & (table["k"] == 0)]
    assert mc.groupby("step")["eigenvalue"].nunique().min() == DRAWS
    per_draw = pd.read_csv(tmp_path / "ref" / "spectrum_approximations_draws.csv")
    assert_finite(per_draw, list(QUANTITIES))
    summary = pd.read_csv(tmp_path / "ref" / "spectrum_approximations_distances.csv")
    spread = [
        f"{q}_{s}" for q in QUANTITIES for s in ("median", "q10", "q90", "min", "max")
    ]
    assert_finite(summary, spread)
    for q in QUANTITIES:
        assert (summary[f"{q}_min"] <= summary[f"{q}_median"]).all()
        assert (summary[f"{q}_median"] <= summary[f"{q}_max"]).all()
    approx = summary[summary["method"] != "exact"]
    assert (approx["num_draws"] == DRAWS).all()
    exact = summary[summary["method"] == "exact"]
    assert (exact["wasserstein_log10_max"] == 0).all()
    assert (exact["top_ratio_median"] == 1).all()
    assert (tmp_path / "ref" / "spectra_digits_mlp.png").exists()
