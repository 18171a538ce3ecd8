"""Study 1 end to end in a tiny configuration, and its resume."""

import experiments.noise_during_training.run as study
from tests.experiments.utils import assert_finite, assert_resumes

ARGV = [
    "--problem",
    "digits_mlp",
    "--epochs",
    "0.5",
    "--batch-size",
    "64",
    "--steps",
    "0,5,11",
    "--eval-batch-size",
    "12",
    "--no-progress",
]
N, C = 12, 10


def test_noise_study_table_and_resume(monkeypatch, tmp_path):
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
            <= 1e-5 * rows["eigenvalue"].max()
        ).all()
    assert list((tmp_path / "ref").glob("noise_digits_mlp_*.png"))
    assert (tmp_path / "ref" / "environment.json").exists()
