"""Study 5 end to end in a tiny configuration, and its resume."""

import pandas as pd
import pytest

import experiments.diagonal_vs_spectrum.run as study
from tests.experiments.utils import assert_finite, assert_resumes, tiny_training

DRAWS = 3
ARGV = [
    *tiny_training(),
    "--lanczos-iters",
    "10",
    "--lanczos-probes",
    "2",
    "--draws",
    str(DRAWS),
]


@pytest.mark.slow  # end to end; runs in the full suite (CI), not in `make test`
def test_diagonal_study_table_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "diagonal_table", call=2
    )
    assert_finite(table, ["value", "weight", "dim", "draw"])
    mc = table[table["kind"] == "diag_mc"]
    assert (mc.groupby("step")["draw"].nunique() == DRAWS).all()
    summary = pd.read_csv(tmp_path / "ref" / "diagonal_vs_spectrum_summary.csv")
    spread = [
        f"{q}_{s}"
        for q in ("trace", "largest", "num_above_1e-3_max")
        for s in ("median", "q10", "q90", "min", "max")
    ]
    assert_finite(summary, spread)
    for _, rows in summary.groupby("step"):
        stats = rows.set_index("kind")
        assert stats.loc["diag_exact", "count"] == 650  # D of logistic regression
        assert stats.loc["diag_mc", "num_draws"] == DRAWS
        assert stats.loc["diag_exact", "num_draws"] == 1
        assert stats.loc["spectrum_exact", "count"] <= 16 * 9
        # the MC draws differ, the exact kinds have no spread
        assert stats.loc["diag_mc", "trace_min"] < stats.loc["diag_mc", "trace_max"]
        assert (
            stats.loc["diag_exact", "trace_min"] == stats.loc["diag_exact", "trace_max"]
        )
        # same trace; Schur-Horn: the largest diagonal entry is at most λ_max
        exact_trace = stats.loc["spectrum_exact", "trace_median"]
        assert abs(stats.loc["diag_exact", "trace_median"] / exact_trace - 1) < 1e-9
        assert stats.loc["diag_exact", "largest_median"] <= stats.loc[
            "spectrum_exact", "largest_median"
        ] * (1 + 1e-9)
    assert (tmp_path / "ref" / "diagonal_digits_logreg.png").exists()
