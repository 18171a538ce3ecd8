"""Study 5 end to end in a tiny configuration, and its resume."""

import pandas as pd

import experiments.diagonal_vs_spectrum.run as study
from tests.experiments.utils import assert_finite, assert_resumes

ARGV = [
    "--problem",
    "digits_logreg",
    "--epochs",
    "0.5",
    "--batch-size",
    "64",
    "--steps",
    "0,11",
    "--eval-batch-size",
    "16",
    "--lanczos-iters",
    "10",
    "--lanczos-probes",
    "2",
    "--no-progress",
]


def test_diagonal_study_table_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "diagonal_table", call=2
    )
    assert_finite(table, ["value", "weight", "dim"])
    summary = pd.read_csv(tmp_path / "ref" / "diagonal_vs_spectrum_summary.csv")
    for _, rows in summary.groupby("step"):
        stats = rows.set_index("kind")
        assert stats.loc["diag_exact", "count"] == 650  # D of logistic regression
        assert stats.loc["spectrum_exact", "count"] <= 16 * 9
        # same trace; Schur-Horn: the largest diagonal entry is at most λ_max
        assert (
            abs(
                stats.loc["diag_exact", "trace"] / stats.loc["spectrum_exact", "trace"]
                - 1
            )
            < 1e-3
        )
        assert stats.loc["diag_exact", "largest"] <= stats.loc[
            "spectrum_exact", "largest"
        ] * (1 + 1e-5)
    assert (tmp_path / "ref" / "diagonal_digits_logreg.png").exists()
