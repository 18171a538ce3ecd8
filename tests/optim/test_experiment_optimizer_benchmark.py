"""End-to-end check of the optimiser benchmark on a tiny configuration."""

import math

import numpy as np
import pandas as pd
import pytest

from experiments.optimizer_benchmark import ablation
from experiments.optimizer_benchmark import run as bench
from experiments.optimizer_benchmark.optimizers import PEERS, peers_available, specs
from tests.experiments.study_checks import (
    assert_second_run_is_refused,
    assert_truncated_table_is_recomputed,
    checked_tables,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARGV = ["--problems", "digits_logreg", "--seeds", "1", "--steps", "4",
        "--eval-every", "2", "--first-order-factor", "2", "--quadratic-seeds", "2",
        "--quadratic-steps", "3", "--no-progress", "--threads", "1"]  # fmt: skip


def test_grids_are_fine_enough():
    table = specs(fine=True)
    constants = np.log10(table["newton_constant"].grid)
    assert np.allclose(np.diff(constants), 0.25, atol=2e-3)  # 4 per decade
    assert len(table["sgd"].grid) >= 4 and len(table["adam"].grid) >= 4
    assert table["newton_default"].grid == (0.0,)


def test_tiny_benchmark_end_to_end(tmp_path):
    names = ["sgd", "newton_constant", "newton_default"]
    argv = [*ARGV, "--optimizers", *names, "--out", str(tmp_path)]
    summary = bench.main(argv)
    assert list(summary["optimizer"]) == names
    assert np.isfinite(summary[["train_loss", "test_accuracy", "time_per_step_ms"]]
                       .to_numpy()).all()  # fmt: skip
    assert (summary["divergences"] >= 0).all()
    assert summary.set_index("optimizer").loc["newton_constant", "grid_size"] == 17
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert curves.groupby("optimizer")["step"].max().to_dict() == {
        "newton_constant": 4, "newton_default": 4, "sgd": 8}  # fmt: skip
    nq = pd.read_csv(tmp_path / "quadratic_summary.csv")
    assert set(nq["noise"]) == {"gaussian", "heavy_tailed", "growing"}
    assert np.isfinite(nq["ratio_to_best_constant"]).all()
    assert (tmp_path / "optimizer_benchmark.png").stat().st_size > 0
    # resume: no table is recomputed
    tables = sorted((tmp_path / "tables").glob("*.csv"))
    stamps = [t.stat().st_mtime_ns for t in tables]
    bench.main(argv)
    assert [t.stat().st_mtime_ns for t in tables] == stamps


@pytest.mark.skipif(not peers_available(), reason="pytorch-optimizer not installed")
@pytest.mark.parametrize("name", PEERS)
def test_peers_train(name, tmp_path):
    from experiments.optimizer_benchmark.training import train
    from experiments.problems import get_problem

    problem = get_problem("digits_logreg")
    spec = specs(fine=False)[name]
    table = train(problem, problem.load_data(), spec, spec.grid[0], 0, 3, 3, 32)
    assert math.isfinite(table["train_loss"].iloc[-1])


def test_truncated_table_is_recomputed_and_changed_option_is_new(tmp_path):
    argv = [*ARGV, "--optimizers", "newton_default", "--out", str(tmp_path)]
    first = bench.main(argv)
    (table, *quadratic) = checked_tables(tmp_path / "tables")
    assert table.name.startswith("problem=digits_logreg_optimizer=newton_default")
    assert len(quadratic) == 6  # 3 noise models x 2 seeds
    assert_truncated_table_is_recomputed(
        lambda: bench.main(argv), tmp_path, table, deterministic=False
    )
    assert_truncated_table_is_recomputed(
        lambda: bench.main(argv), tmp_path, quadratic[0]
    )
    changed = bench.main([*argv, "--batch-size", "16"])
    assert len(checked_tables(tmp_path / "tables")) == 8
    assert changed["train_loss"][0] != first["train_loss"][0]
    bench.main([*argv, "--quadratic-steps", "4"])
    assert len(checked_tables(tmp_path / "tables")) == 14


def test_second_run_on_one_folder_is_refused(tmp_path):
    argv = [*ARGV, "--optimizers", "newton_default", "--out", str(tmp_path)]
    assert_second_run_is_refused(lambda: bench.main(argv), tmp_path)


def test_tiny_ablation_writes_its_tables_atomically(tmp_path, monkeypatch):
    configs = {name: ablation.CONFIGS[name] for name in ("shipped", "no_safeguards")}
    monkeypatch.setattr(ablation, "CONFIGS", configs)
    argv = ["--problems", "digits_logreg", "--seeds", "1", "--steps", "2"]
    argv += ["--threads", "1", "--out", str(tmp_path)]
    score = ablation.main(argv)
    table = pd.read_csv(tmp_path / "ablation" / "ablation.csv")
    assert sorted(table["config"]) == sorted(configs)
    summary = pd.read_csv(tmp_path / "ablation" / "ablation_summary.csv")
    assert list(summary["config"]) == list(score.index)
    assert np.allclose(summary["geomean_vs_best"], score["geomean_vs_best"])
    assert not list((tmp_path / "ablation").glob(".*.tmp"))
    assert_second_run_is_refused(lambda: ablation.main(argv), tmp_path / "ablation")


def test_tuned_values_of_an_earlier_run_are_reused(tmp_path):
    argv = [*ARGV, "--optimizers", "sgd", "--skip-quadratic"]
    first = bench.main([*argv, "--out", str(tmp_path / "first")])
    tuned = str(tmp_path / "first" / "tuning.csv")
    second = bench.main([*argv, "--out", str(tmp_path / "second"), "--tuned", tuned])
    assert len(checked_tables(tmp_path / "second" / "tables")) == 1  # no grid
    pd.testing.assert_frame_equal(
        first.drop(columns=["time_per_step_ms", "train_loss_equal_time"]),
        second.drop(columns=["time_per_step_ms", "train_loss_equal_time"]),
    )
    with pytest.raises(SystemExit, match="other batch_size"):
        bench.main([*argv, "--batch-size", "16", "--out", str(tmp_path / "third"),
                    "--tuned", tuned])  # fmt: skip
