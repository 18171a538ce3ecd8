"""Study 7 end to end in a tiny configuration, and its resume."""

import experiments.gradient_variance.run as study
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
    "8",
    "--num-batches",
    "2",
    "--top-k",
    "5",
    "--no-progress",
]


def test_variance_study_table_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "variance_table", call=3
    )
    assert_finite(
        table,
        [
            "grad_norm_sq",
            "grad_var_trace",
            "eigenvalue",
            "lambda_var",
            "lambda_frac_snr_gt1",
        ],
    )
    assert set(table["batch"]) == {0, 1} and set(table["optimizer"]) == {"sgd", "adam"}
    assert (table["grad_var_trace"] > 0).all() and (table["lambda_var"] >= 0).all()
    assert table.groupby(["optimizer", "step", "batch"]).size().max() <= 5
    assert table["lambda_frac_snr_gt1"].between(0, 1).all()
    assert (tmp_path / "ref" / "variance_digits_logreg.png").exists()
