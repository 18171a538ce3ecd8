"""Study 6 end to end in a tiny configuration, and its resume."""

import numpy as np

import experiments.loss_landscape.run as study
from tests.experiments.utils import assert_finite, assert_resumes, tiny_training

ARGV = [
    *tiny_training(),
    "--num-points",
    "5",
    "--train-samples",
    "128",
    "--radius",
    "0.5",
]


def _second_difference(rows):
    line = rows[rows["beta"] == 0].set_index("alpha")["loss"].sort_index()
    return line.iloc[0] + line.iloc[-1] - 2 * line.loc[0.0]


def test_landscape_table_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "landscape_table", call=2
    )
    assert_finite(table, ["alpha", "beta", "loss"])
    assert set(table["plane"]) == {"top", "random"}
    assert set(table["split"]) == {"train", "test"}
    for _, rows in table.groupby(["step", "split"]):
        assert len(rows) == 2 * 5 * 5
        origin = rows[(rows["alpha"] == 0) & (rows["beta"] == 0)]["loss"]
        assert origin.max() - origin.min() < 1e-6  # same weights in both planes
        top = rows[rows["plane"] == "top"]
        assert top["lambda_1"].iloc[0] >= top["lambda_2"].iloc[0] > 0
        # the top eigen-direction is far more curved than a random one
        assert _second_difference(top) > 5 * _second_difference(
            rows[rows["plane"] == "random"]
        )
    assert (tmp_path / "ref" / "landscape_digits_logreg.png").exists()


def test_contour_levels_are_shared_by_both_planes():
    from experiments.loss_landscape.plot import shared_levels

    top, random = np.linspace(1.0, 9.0, 25), np.linspace(2.0, 2.5, 25)
    levels = shared_levels(np.concatenate([top, random]))
    assert levels[0] == 1.0 and levels[-1] == 9.0
    assert (np.diff(levels) > 0).all()
    # the flat random plane still gets distinct colours: quantile levels
    assert ((levels >= 2.0) & (levels <= 2.5)).sum() >= 3
