"""Study 1 end to end in a tiny configuration, and its resume."""

import numpy as np
import pandas as pd
import pytest

import experiments.noise_during_training.run as study
from experiments.common.spectrum import (
    THRESHOLDS,
    TOP_K,
    spectrum_summary,
    tag,
)
from tests.experiments.utils import assert_finite, assert_resumes, tiny_training

ARGV = tiny_training("digits_mlp", "0,5,11", 12)
N, C = 12, 10


@pytest.mark.slow  # end to end; runs in the full suite (CI), not in `make test`
def test_noise_study_table_and_resume(monkeypatch, tmp_path, capsys):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "noise_table", call=3
    )
    assert_finite(
        table,
        [
            "eigenvalue",
            "gamma",
            "abs_gamma",
            "gamma_snr",
            "lambda_snr",
            "overlap",
            "flat_overlap",
            "loss",
        ],
    )
    assert set(table["optimizer"]) == {"sgd", "adam"}
    assert set(table["precision"]) == {"float64"}
    assert sorted(table["step"].unique()) == [0, 5, 11]
    for _, rows in table.groupby(["optimizer", "step"]):
        assert 0 < len(rows) <= N * (C - 1)
        assert (rows["num_nontrivial"] == len(rows)).all()
        assert rows["overlap"].sum() <= 1 + 1e-6
        assert abs(rows["overlap"].sum() + rows["flat_overlap"].iloc[0] - 1) < 1e-9
        assert (rows["eigenvalue"] > 0).all()
        assert rows["eigenvalue"].is_monotonic_decreasing
        # the mean of the per-sample curvatures λ_nk is the eigenvalue λ_k
        assert (
            (rows["lambda_mean"] - rows["eigenvalue"]).abs()
            <= 1e-9 * rows["eigenvalue"].max()
        ).all()
    summary = pd.read_csv(tmp_path / "ref" / "noise_during_training_summary.csv")
    columns = [
        "lambda_max",
        "trace",
        "stable_rank",
        "participation_rank",
        *(f"overlap_top{k}" for k in TOP_K),
        *(
            f"{name}_{tag(f)}"
            for f in THRESHOLDS
            for name in (
                "num_above",
                "overlap_above",
                "lambda_snr_gt1_share",
                "gamma_snr_gt1_share",
            )
        ),
    ]
    assert_finite(summary, columns)
    assert len(summary) == 6
    for fine, coarse in zip(THRESHOLDS[1:], THRESHOLDS[:-1], strict=True):
        # lower thresholds keep more directions and more of the gradient
        assert (
            summary[f"num_above_{tag(fine)}"] >= summary[f"num_above_{tag(coarse)}"]
        ).all()
        assert (
            summary[f"overlap_above_{tag(fine)}"]
            >= summary[f"overlap_above_{tag(coarse)}"] - 1e-12
        ).all()
    assert (summary["participation_rank"] >= summary["stable_rank"] - 1e-9).all()
    out = capsys.readouterr().out
    assert "K=" in out and "λ_max=" in out and "SNR(λ)>1" in out
    assert list((tmp_path / "ref").glob("noise_digits_mlp_*.png"))
    assert (tmp_path / "ref" / "environment.json").exists()


def test_summary_is_insensitive_to_the_cut_off():
    """Dropping directions below 1e-6·λ_max leaves every reported quantity alone."""
    rng = np.random.default_rng(0)
    evals = np.sort(10.0 ** rng.uniform(-12, 0, 200))[::-1]
    rows = pd.DataFrame(
        {
            "eigenvalue": evals,
            "overlap": rng.dirichlet(np.ones(200)),
            "lambda_snr": rng.uniform(0, 2, 200),
            "gamma_snr": rng.uniform(0, 2, 200),
        }
    )
    full = spectrum_summary(rows)
    cut = spectrum_summary(rows[rows["eigenvalue"] > 1e-7 * evals[0]])
    assert cut["num_computed"] < full["num_computed"]
    for key, value in full.items():
        if key != "num_computed":
            assert np.isclose(cut[key], value, rtol=1e-6, atol=1e-6), key
    assert full["overlap_top1"] == rows["overlap"].iloc[0]
