"""The Chebyshev (KPM) density of the Lanczos benchmark against exact spectra."""

import numpy as np
import pytest
import torch

from experiments.benchmarks.hessianfree.kpm import (
    chebyshev_moments,
    jackson,
    kpm_density,
)


def _matrix(evals, seed=0):
    q, _ = torch.linalg.qr(
        torch.randn(len(evals), len(evals), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    )  # fmt: skip
    return q @ torch.diag(torch.as_tensor(evals)) @ q.T


@pytest.mark.parametrize("num_moments", [2, 5, 8])
def test_identity_probes_give_the_exact_moments(num_moments):
    evals = np.linspace(-0.5, 3.0, 30) ** 3
    mat = _matrix(evals)
    count = {"n": 0}

    def matmat(v):
        count["n"] += v.shape[1]
        return mat @ v

    center, half = 10.0, 20.0
    moments = chebyshev_moments(
        matmat, torch.eye(30, dtype=torch.float64), center, half, num_moments
    )
    t = (evals - center) / half
    exact = [np.polynomial.chebyshev.chebval(t, np.eye(num_moments)[k]).mean()
             for k in range(num_moments)]  # fmt: skip
    np.testing.assert_allclose(moments.numpy(), exact, atol=1e-12)
    assert count["n"] == 30 * (num_moments // 2)


def test_jackson_factors():
    g = jackson(50)
    assert g[0] == pytest.approx(1.0) and (np.diff(g) < 0).all() and g[-1] > 0


def test_density_matches_the_smoothed_spectrum_and_improves_with_moments():
    rng = np.random.default_rng(0)
    evals = np.concatenate([rng.normal(0, 0.3, 380), rng.uniform(3, 4, 20)])
    mat = _matrix(evals)
    grid = np.linspace(evals.min() - 0.5, evals.max() + 0.5, 4001)
    sigma = 0.05
    ref = np.exp(-0.5 * ((grid[:, None] - evals) / sigma) ** 2).sum(1)
    ref /= len(evals) * sigma * np.sqrt(2 * np.pi)
    errors = []
    for moments in (20, 80):
        kpm = kpm_density(mat, moments, 50, generator=torch.Generator().manual_seed(1))
        dens = kpm.density(grid)
        assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=0.05)
        errors.append(np.trapezoid(np.abs(dens - ref), grid))
        assert kpm.num_products == 30 + 50 * (moments // 2)
    assert errors[1] < errors[0] and errors[1] < 0.3


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_moments >= 2"):
        kpm_density(torch.eye(3, dtype=torch.float64), 1, 4)
