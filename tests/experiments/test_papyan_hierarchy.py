"""Study 4 end to end in a tiny configuration, and its resume."""

import importlib.util

import numpy as np
import pandas as pd
import pytest

import experiments.papyan_hierarchy.run as study
from tests.experiments.utils import assert_finite, assert_resumes, tiny_training

N, C = 12, 10
# the Lanczos part needs vivitlib.hessianfree's eigensolvers
FULL = importlib.util.find_spec("vivitlib.hessianfree.density") is not None
ARGV = [
    *tiny_training(eval_batch=N),
    "--full-data-samples",
    "40",
    "--lanczos-iters",
    "8",
    "--lanczos-probes",
    "2",
]


@pytest.mark.slow  # end to end; runs in the full suite (CI), not in `make test`
def test_papyan_study_tables_and_resume(monkeypatch, tmp_path, capsys):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "full_data_table", call=2
    )
    assert_finite(table, ["eigenvalue", "step", "k"])
    parts = {"A1", "A2", "B1", "B2"}
    assert set(table["matrix"]) == {"G", *parts, *(f"G-{p}" for p in parts)}
    assert set(table["split"]) == {"train", "test"}
    summary = pd.read_csv(tmp_path / "ref" / "papyan_hierarchy_summary.csv")
    assert_finite(summary, ["top", "lambda_last_outlier", "lambda_after", "rank"])
    for _, rows in summary.groupby(["split", "step"]):
        stats = rows.set_index("matrix")
        shares = stats["trace_share"]
        # the parts sum to the GGN: their traces add up to its trace
        assert abs(shares[sorted(parts)].sum() - 1) < 1e-8
        for part in parts:  # G - X has the trace of G minus that of X
            assert abs(shares[f"G-{part}"] + shares[part] - 1) < 1e-8
            assert stats.loc[f"G-{part}", "top"] <= stats.loc["G", "top"] * (1 + 1e-9)
        ranks = stats["rank"]
        assert ranks["A1"] <= C and ranks["A2"] <= C and ranks["G"] <= N * (C - 1)
        assert ranks["G-A1"] >= ranks["G"] - ranks["A1"]
        assert ranks["G-B2"] <= ranks["A1"] + ranks["A2"] + ranks["B1"]
    verdicts = pd.read_csv(tmp_path / "ref" / "papyan_hierarchy_attribution.csv")
    assert len(verdicts) == 4  # (train, test) x 2 steps
    assert_finite(verdicts, [f"removed_share_{p}" for p in sorted(parts)])
    out = capsys.readouterr().out
    assert "Papyan's claim" in out and ("HOLD" in out or "PARTLY" in out)
    means = pd.read_csv(tmp_path / "ref" / "papyan_hierarchy_class_means.csv")
    assert_finite(means, ["value", "cosine"])
    diagonal = means[means["row"] == means["col"]]
    assert (
        np.allclose(diagonal["cosine"], 1) and (means["cosine"].abs() <= 1 + 1e-9).all()
    )
    if not FULL:
        return
    full = pd.read_csv(tmp_path / "ref" / "papyan_hierarchy_full_data.csv")
    assert set(full["operator"]) == {"hessian", "ggn", "residual"}
    top = full[full["kind"] == "top"]
    assert (
        np.isfinite(top["x"]).all()
        and (top.groupby(["step", "operator"]).size() == C).all()
    )
    # for logistic regression the Hessian is the GGN: the residual vanishes
    res = top.loc[top["operator"] == "residual", "x"].abs().max()
    assert res < 1e-6 * top["x"].abs().max()
    assert list((tmp_path / "ref").glob("hierarchy_*.png"))
    assert list((tmp_path / "ref").glob("class_means_*.png"))
