"""End-to-end check of the noisy-quadratic experiment on a tiny configuration."""

import numpy as np
import pandas as pd
import pytest

from experiments.noisy_quadratic import run as nq_run
from experiments.noisy_quadratic.problem import NoisyQuadratic, run


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


def test_tiny_study_end_to_end(tmp_path):
    argv = ["--seeds", "2", "--steps", "3", "--dim", "4", "--batch-size", "16"]
    argv += ["--dampings", "1e-4", "1", "--out", str(tmp_path), "--no-progress"]
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
    example = pd.read_csv(tmp_path / "runs" / "bootstrap" / "seed_000.csv")
    dampings = example[[f"damping_{k}" for k in range(1, 5)]].to_numpy()[:-1]
    assert ((dampings > 0) | np.isnan(dampings)).all()
    assert (tmp_path / "noisy_quadratic.png").stat().st_size > 0
    # resume: existing run files are kept as they are
    path = tmp_path / "runs" / "SGD" / "seed_001.csv"
    stamp = path.stat().st_mtime_ns
    nq_run.main(argv + ["--no-plot"])
    assert path.stat().st_mtime_ns == stamp
    # other settings in the same folder are refused
    with pytest.raises(SystemExit, match="other settings"):
        nq_run.main(argv[:-3] + ["--gamma-var", "1", "--out", str(tmp_path)])
