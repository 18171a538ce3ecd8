"""End-to-end check of the noisy-quadratic experiment on a tiny configuration."""

import numpy as np
import pandas as pd
import pytest

from experiments.noisy_quadratic import plot
from experiments.noisy_quadratic import run as nq_run
from experiments.problems.noisy_quadratic import NoisyQuadratic, run
from tests.experiments.study_checks import (
    assert_second_run_is_refused,
    assert_truncated_table_is_recomputed,
    checked_tables,
)


def test_noise_model_is_unbiased():
    problem = NoisyQuadratic(dim=3, batch_size=20_000, lambda_var=20.0)
    theta = np.array([1.0, -2.0, 0.5])
    gammas, lambdas = problem.observe(theta, np.random.default_rng(0))
    lam = np.array([2.0, 8.0, 18.0])
    assert np.allclose(gammas.mean(0), lam * theta, atol=3.0)
    assert np.allclose(lambdas.mean(0), lam, rtol=0.1)
    assert np.allclose(gammas.var(0), problem.gamma_var, rtol=0.05)
    assert np.allclose(lambdas.var(0), problem.lambda_var, rtol=0.15)
    assert (lambdas > 0).all()


@pytest.mark.parametrize("noise", ["heavy_tailed", "growing"])
def test_other_noise_models_are_unbiased(noise):
    problem = NoisyQuadratic(dim=3, batch_size=50_000, noise=noise)
    theta = np.array([1.0, 0.0, 0.5])
    gammas, lambdas = problem.observe(theta, np.random.default_rng(0))
    lam = np.array([2.0, 8.0, 18.0])
    assert np.allclose(gammas.mean(0), lam * theta, atol=3.0)
    assert np.allclose(lambdas.mean(0), lam, rtol=0.1)
    assert (lambdas > 0).all()
    if noise == "growing":  # ten times the variance where θ_k = 0
        assert gammas.var(0)[1] == pytest.approx(10 * problem.gamma_var, rel=0.05)
    else:  # a few samples carry much of the curvature
        assert np.median(lambdas[:, 0]) < 0.9 * lam[0]


def test_noise_free_newton_solves_in_one_step():
    problem = NoisyQuadratic(dim=4, batch_size=2, gamma_var=0.0, lambda_var=0.0)
    frame = run(problem, "constant_0e+00", seed=0, steps=1)
    assert frame["loss"].iloc[-1] == pytest.approx(0.0, abs=1e-20)


ARGV = ["--seeds", "2", "--steps", "3", "--dim", "4", "--batch-size", "16"]
ARGV += ["--dampings", "1e-4", "1", "--no-progress"]


def _tables(out):
    return {p: p.read_bytes() for p in checked_tables(out)}


def test_tiny_study_end_to_end(tmp_path):
    argv = [*ARGV, "--out", str(tmp_path)]
    nq_run.main(argv)
    summary = pd.read_csv(tmp_path / "summary.csv")
    final = pd.read_csv(tmp_path / "final.csv")
    names = ["SGD", "constant_0.0001", "constant_1", "bootstrap"]
    names.append("bootstrap_safeguarded")
    assert list(dict.fromkeys(summary["optimizer"])) == names
    assert {"loss_median", "loss_q25", "loss_q75", "loss_mean"} <= set(summary)
    assert len(summary) == len(names) * 4
    assert np.isfinite(summary.drop(columns="optimizer").to_numpy()).all()
    assert len(final) == len(names) * 2
    assert np.isfinite(final[["loss", "distance"]].to_numpy()).all()
    (example,) = (tmp_path / "tables").glob("optimizer=bootstrap_seed=0_opt-*.csv")
    example = pd.read_csv(example)
    assert list(example.columns[:3]) == ["optimizer", "seed", "step"]
    pd.testing.assert_frame_equal(
        example, run(NoisyQuadratic(dim=4, batch_size=16), "bootstrap", 0, steps=3)
    )
    dampings = example[[f"damping_{k}" for k in range(1, 5)]].to_numpy()[:-1]
    assert ((dampings > 0) | np.isnan(dampings)).all()
    assert (tmp_path / "noisy_quadratic.png").stat().st_size > 0
    # resume: valid run tables are reused as they are
    tables = _tables(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in tables}
    assert len(tables) == len(names) * 2
    nq_run.main(argv + ["--no-plot"])
    assert {p: p.stat().st_mtime_ns for p in tables} == stamps
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "final.csv"), final)


def test_truncated_run_table_is_recomputed(tmp_path):
    argv = [*ARGV, "--no-plot", "--out", str(tmp_path)]
    nq_run.main(argv)
    final = pd.read_csv(tmp_path / "final.csv")
    path = next((tmp_path / "tables").glob("optimizer=bootstrap_seed=1_*.csv"))
    assert_truncated_table_is_recomputed(lambda: nq_run.main(argv), tmp_path, path)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "final.csv"), final)


@pytest.mark.parametrize(
    "option", [["--gamma-var", "1"], ["--steps", "2"], ["--sgd-lr", "0.01"]]
)
def test_changed_option_gives_a_new_result(tmp_path, option):
    argv = [*ARGV, "--no-plot", "--out", str(tmp_path / "out")]
    nq_run.main(argv)
    first = pd.read_csv(tmp_path / "out" / "final.csv")
    tables = _tables(tmp_path / "out")
    nq_run.main([*argv, *option])
    changed = pd.read_csv(tmp_path / "out" / "final.csv")
    nq_run.main([*argv, *option, "--out", str(tmp_path / "fresh")])
    pd.testing.assert_frame_equal(
        changed, pd.read_csv(tmp_path / "fresh" / "final.csv")
    )
    assert not changed.equals(first)
    assert all(_tables(tmp_path / "out")[p] == data for p, data in tables.items())
    nq_run.main(argv)  # the first results are still there and reused
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "final.csv"), first)


def test_second_run_on_one_folder_is_refused(tmp_path):
    argv = [*ARGV, "--no-plot", "--out", str(tmp_path)]
    assert_second_run_is_refused(lambda: nq_run.main(argv), tmp_path)


def test_plot_redraws_from_the_results_folder(tmp_path):
    argv = [*ARGV, "--no-plot", "--out", str(tmp_path), "--damping-seed", "1"]
    nq_run.main(argv)
    tables = _tables(tmp_path)
    plot.main(["--out", str(tmp_path), "--damping-seed", "1"])
    assert (tmp_path / "noisy_quadratic.png").stat().st_size > 0
    assert _tables(tmp_path) == tables  # the example run's table was reused
