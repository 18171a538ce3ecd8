"""End-to-end check of the digits optimizer comparison on a tiny configuration."""

import numpy as np
import pandas as pd
import pytest

from experiments.optimizers_digits import run as digits_run
from experiments.optimizers_digits.training import OPTIMIZERS
from tests.experiments.study_checks import (
    assert_curves_keyed_by_sgd_lr,
    assert_second_run_is_refused,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_tiny_comparison_end_to_end(tmp_path):
    argv = ["--steps", "4", "--eval-every", "2", "--seeds", "1", "--batch-size", "32"]
    argv += ["--out", str(tmp_path), "--no-progress", "--threads", "1"]
    summary = digits_run.main(argv)
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert list(dict.fromkeys(curves["optimizer"])) == list(OPTIMIZERS)
    assert sorted(set(curves["step"])) == [0, 2, 4]
    metrics = ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]
    assert np.isfinite(curves[metrics].to_numpy()).all()
    trained = curves[curves["step"] > 0]
    assert (trained["step_time_s"] > 0).all() and (trained["time_s"] > 0).all()
    newton = trained[trained["optimizer"].str.startswith("newton")]
    assert (newton["directions"] > 0).all()
    assert set(summary["optimizer"]) == set(OPTIMIZERS)
    assert np.isfinite(summary["step_time_ms"]).all()
    assert (tmp_path / "optimizers_digits.png").stat().st_size > 0
    assert len(list((tmp_path / "tables").glob("*.csv"))) == len(OPTIMIZERS)
    # resume: the per-run tables are reused
    table = next((tmp_path / "tables").glob("*.csv"))
    stamp = table.stat().st_mtime_ns
    digits_run.main(argv)
    assert table.stat().st_mtime_ns == stamp


SGD_ONLY = ["--steps", "4", "--eval-every", "2", "--seeds", "1", "--batch-size", "32"]
SGD_ONLY += ["--optimizers", "sgd", "--no-progress", "--threads", "1"]


def test_truncated_table_is_recomputed_and_changed_option_is_new(tmp_path):
    argv = [*SGD_ONLY, "--out", str(tmp_path)]
    assert_curves_keyed_by_sgd_lr(digits_run.main, argv, tmp_path)


def test_second_run_on_one_folder_is_refused(tmp_path):
    argv = [*SGD_ONLY, "--out", str(tmp_path)]
    assert_second_run_is_refused(lambda: digits_run.main(argv), tmp_path)
