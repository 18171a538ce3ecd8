"""End-to-end check of the Lanczos-Newton comparison on a tiny configuration."""

import numpy as np
import pandas as pd
import pytest

from experiments.lanczos_newton import run as lanczos_run
from experiments.lanczos_newton.training import OPTIMIZERS
from tests.experiments.study_checks import (
    assert_curves_keyed_by_sgd_lr,
    assert_second_run_is_refused,
    assert_truncated_table_is_recomputed,
    checked_tables,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARGV = ["--steps", "4", "--eval-every", "2", "--seeds", "1", "--batch-size", "32",
        "--time-budget", "0.05", "--time-points", "2", "--max-steps", "6",
        "--k", "3", "--refresh-every", "2", "--curvature-batch-size", "32",
        "--no-progress", "--threads", "1"]  # fmt: skip


def test_tiny_comparison_end_to_end(tmp_path):
    argv = [*ARGV, "--out", str(tmp_path)]
    summary = lanczos_run.main(argv)
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert list(dict.fromkeys(curves["optimizer"])) == list(OPTIMIZERS)
    columns = ["step", "time_s", "step_time_s", "batch_loss", "train_loss",
               "train_accuracy", "test_loss", "test_accuracy", "refreshes",
               "products", "products_per_refresh", "refresh_time_s", "diverged"]  # fmt: skip
    assert set(columns) <= set(curves.columns)
    metrics = ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "time_s"]
    assert np.isfinite(curves[metrics].to_numpy()).all()
    for _, run in curves.groupby("optimizer"):
        assert {0, 2, 4} <= set(run["step"]) and run["step"].max() <= 6
    trained = curves[curves["step"] > 0]
    assert (trained["step_time_s"] > 0).all()
    lanczos = curves[curves["optimizer"].str.startswith("lanczos")]
    assert (lanczos["products"] > 0).all() and (
        lanczos["products_per_refresh"] > 0
    ).all()
    assert (lanczos.groupby("optimizer")["refreshes"].max() >= 2).all()
    assert (
        curves.loc[~curves["optimizer"].str.startswith("lanczos"), "products"] == 0
    ).all()
    assert set(summary["regime"]) == {"matched_steps", "matched_time"}
    assert set(summary["optimizer"]) == set(OPTIMIZERS)
    steps = summary[summary["regime"] == "matched_steps"]
    assert np.isfinite(steps[["time_per_step_ms", *lanczos_run.METRICS]]).all().all()
    assert (tmp_path / "lanczos_newton.png").stat().st_size > 0
    tables = sorted((tmp_path / "tables").glob("*.csv"))
    assert len(tables) == len(OPTIMIZERS)
    # resume: per-run tables are reused, the combined table is the same
    stamps = [t.stat().st_mtime_ns for t in tables]
    lanczos_run.main(argv)
    assert [t.stat().st_mtime_ns for t in tables] == stamps
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "curves.csv"), curves)


SGD_ONLY = [*ARGV, "--optimizers", "sgd", "--time-budget", "0"]


def test_truncated_table_is_recomputed_and_changed_option_is_new(tmp_path):
    argv = [*SGD_ONLY, "--out", str(tmp_path)]
    assert_curves_keyed_by_sgd_lr(lanczos_run.main, argv, tmp_path)


def test_second_run_on_one_folder_is_refused(tmp_path):
    argv = [*SGD_ONLY, "--out", str(tmp_path)]
    assert_second_run_is_refused(lambda: lanczos_run.main(argv), tmp_path)


def test_tune_recomputes_truncated_tables_and_keys_options(tmp_path):
    from experiments.lanczos_newton import tune

    argv = [*SGD_ONLY, "--out", str(tmp_path)]
    frame = tune.main(argv)
    assert frame["value"].tolist() == list(tune.GRID["sgd"][1])
    tables = checked_tables(tmp_path / "tables")
    assert len(tables) == len(frame)
    assert_truncated_table_is_recomputed(
        lambda: tune.main(argv), tmp_path, tables[0], deterministic=False
    )
    tune.main([*argv, "--batch-size", "16"])
    assert len(checked_tables(tmp_path / "tables")) == 2 * len(frame)
    assert_second_run_is_refused(lambda: tune.main(argv), tmp_path)
