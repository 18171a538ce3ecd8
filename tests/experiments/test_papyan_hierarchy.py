"""Study 4 end to end in a tiny configuration, and its resume."""

import importlib.util

import numpy as np
import pandas as pd

import experiments.papyan_hierarchy.run as study
from tests.experiments.utils import assert_finite, assert_resumes

N, C = 12, 10
# the Lanczos part needs vivitlib.hessianfree's eigensolvers
FULL = importlib.util.find_spec("vivitlib.hessianfree.density") is not None
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
    str(N),
    "--no-progress",
    "--full-data-samples",
    "40",
    "--lanczos-iters",
    "8",
    "--lanczos-probes",
    "2",
]


def test_papyan_study_tables_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "full_data_table", call=2
    )
    assert_finite(table, ["eigenvalue", "step", "k"])
    assert set(table["matrix"]) == {"G", "A1", "A2", "B1", "B2"}
    summary = pd.read_csv(tmp_path / "ref" / "papyan_hierarchy_summary.csv")
    for _, rows in summary.groupby("step"):
        shares = rows.set_index("matrix")["trace_share"]
        # the parts sum to the GGN: their traces add up to its trace
        assert abs(shares.drop("G").sum() - 1) < 1e-4
        ranks = rows.set_index("matrix")["rank"]
        assert ranks["A1"] <= C and ranks["A2"] <= C and ranks["G"] <= N * (C - 1)
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
