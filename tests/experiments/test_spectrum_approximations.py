"""Study 2 end to end in a tiny configuration, and its resume."""

import pandas as pd

import experiments.spectrum_approximations.run as study
from tests.experiments.utils import assert_finite, assert_resumes

N, C = 16, 10
ARGV = [
    "--problem",
    "digits_mlp",
    "--epochs",
    "0.5",
    "--batch-size",
    "64",
    "--steps",
    "0,11",
    "--eval-batch-size",
    str(N),
    "--no-progress",
]


def test_spectra_table_distances_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "spectra_table", call=2
    )
    assert_finite(table, ["eigenvalue", "num_columns", "step"])
    bound = {"exact": N * (C - 1), "subsampled_1/8": (N // 8) * (C - 1), "mc_1": N}
    for (step, method), rows in table.groupby(["step", "method"]):
        assert 0 < len(rows) <= bound[method], (step, method)
        assert (rows["eigenvalue"] > 0).all()
    summary = pd.read_csv(tmp_path / "ref" / "spectrum_approximations_distances.csv")
    assert_finite(summary, ["wasserstein_log10", "top_ratio", "trace_ratio"])
    exact = summary[summary["method"] == "exact"]
    assert (exact["wasserstein_log10"] == 0).all() and (exact["top_ratio"] == 1).all()
    assert (summary["wasserstein_log10"] >= 0).all()
    assert (tmp_path / "ref" / "spectra_digits_mlp.png").exists()
