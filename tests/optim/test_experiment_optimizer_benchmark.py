"""End-to-end check of the optimiser benchmark on a tiny configuration."""

import math

import numpy as np
import pandas as pd
import pytest

from experiments.optimizer_benchmark import run as bench
from experiments.optimizer_benchmark.optimizers import PEERS, peers_available, specs

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
