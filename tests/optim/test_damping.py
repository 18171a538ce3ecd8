"""Tests for vivitlib.optim.damping: constant and bootstrap damping."""

import math

import numpy as np
import pytest
import torch

from vivitlib.optim.damping import BootstrapDamping, ConstantDamping, DampingStrategy


def reference_bootstrap(gammas, lambdas, candidates, percentile, num_resamples, seed):
    """Loop-by-loop bootstrap damping, drawing the same indices as the library."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    n_g, n_c = gammas.shape[0], lambdas.shape[0]
    idx_g = torch.randint(0, n_g, (num_resamples, n_g), generator=gen)
    if n_g == n_c:
        idx_c = idx_g
    else:
        idx_c = torch.randint(0, n_c, (num_resamples, n_c), generator=gen)
    g = gammas.numpy()
    lam = lambdas.numpy()
    candidates = sorted(float(c) for c in candidates)
    result = []
    for k in range(g.shape[1]):
        g_mean, l_mean = g[:, k].mean(), lam[:, k].mean()
        best_bound, best_delta = -math.inf, None
        for delta in candidates:
            if l_mean + delta <= 0:
                continue
            step = -g_mean / (l_mean + delta)
            reductions = []
            for r in range(num_resamples):
                g_star = np.mean([g[i, k] for i in idx_g[r].tolist()])
                l_star = np.mean([lam[i, k] for i in idx_c[r].tolist()])
                reductions.append(-step * g_star - 0.5 * step**2 * l_star)
            bound = np.percentile(reductions, percentile)
            if bound > best_bound:
                best_bound, best_delta = bound, delta
        result.append(best_delta if best_bound > 0 else math.inf)
    return torch.tensor(result, dtype=torch.float64)


def random_derivatives(n_g, n_c, k, seed):
    gen = torch.Generator().manual_seed(seed)
    signal = torch.linspace(-2.0, 3.0, k, dtype=torch.float64)
    scale = torch.logspace(-1, 1, k, dtype=torch.float64).flip(0)
    gammas = signal + scale * torch.randn(n_g, k, generator=gen, dtype=torch.float64)
    lambdas = torch.rand(n_c, k, generator=gen, dtype=torch.float64) * 3.0
    return gammas, lambdas


@pytest.mark.parametrize(
    "n_g, n_c, k, percentile",
    [(12, 12, 5, 5.0), (10, 6, 4, 5.0), (7, 7, 3, 20.0)],
    ids=["paired", "independent", "percentile20"],
)
def test_bootstrap_matches_reference(n_g, n_c, k, percentile):
    gammas, lambdas = random_derivatives(n_g, n_c, k, seed=n_g + k)
    candidates = [1e-3, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0]
    strategy = BootstrapDamping(
        candidates=candidates, percentile=percentile, num_resamples=25, generator=3
    )
    result = strategy(gammas, lambdas)
    expected = reference_bootstrap(gammas, lambdas, candidates, percentile, 25, 3)
    assert result.shape == (k,)
    assert torch.equal(torch.isinf(result), torch.isinf(expected))
    assert torch.allclose(result, expected)
    # mix of outcomes, so the comparison is not vacuous
    assert len(set(result.tolist())) > 1


def test_bootstrap_zero_noise_picks_smallest_candidate():
    gammas = torch.tensor([[1.0, -2.0, 0.5]]).repeat(16, 1)
    lambdas = torch.tensor([[1.0, 4.0, 0.1]]).repeat(16, 1)
    strategy = BootstrapDamping(candidates=[1e-4, 1e-2, 1.0, 100.0], generator=0)
    assert torch.equal(strategy(gammas, lambdas), torch.full((3,), 1e-4))


def test_bootstrap_pure_noise_takes_no_step():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(64, 6, generator=gen)
    gammas = torch.cat([noise, -noise])  # exactly mean zero per direction
    lambdas = torch.rand(128, 6, generator=gen) + 0.5
    dampings = BootstrapDamping(generator=0)(gammas, lambdas)
    assert torch.isinf(dampings).all()


def test_bootstrap_is_deterministic_given_generator():
    gammas, lambdas = random_derivatives(20, 20, 8, seed=0)
    first = BootstrapDamping(generator=7)(gammas, lambdas)
    second = BootstrapDamping(generator=torch.Generator().manual_seed(7))(
        gammas, lambdas
    )
    assert torch.equal(first, second)
    torch.manual_seed(5)
    third = BootstrapDamping()(gammas, lambdas)
    torch.manual_seed(5)
    assert torch.equal(third, BootstrapDamping()(gammas, lambdas))


def test_bootstrap_state_dict_reproduces_next_call():
    gammas, lambdas = random_derivatives(9, 9, 6, seed=2)
    strategy = BootstrapDamping(num_resamples=10, generator=0)
    strategy(gammas, lambdas)
    state = strategy.state_dict()
    expected = strategy.lower_bounds(gammas, lambdas)
    other = BootstrapDamping(num_resamples=10, generator=99)
    other.load_state_dict(state)
    assert torch.equal(other.lower_bounds(gammas, lambdas), expected)


def test_bootstrap_noisier_direction_gets_larger_damping():
    gen = torch.Generator().manual_seed(0)
    gammas = 1.0 + torch.randn(256, 2, generator=gen, dtype=torch.float64) * (
        torch.tensor([0.1, 5.0], dtype=torch.float64)
    )
    lambdas = torch.ones(256, 2, dtype=torch.float64)
    dampings = BootstrapDamping(generator=0)(gammas, lambdas)
    assert dampings[0] < dampings[1]


def test_bootstrap_empty_directions_and_float32():
    strategy = BootstrapDamping(generator=0)
    out = strategy(torch.zeros(5, 0), torch.zeros(5, 0))
    assert out.shape == (0,)
    out = strategy(torch.ones(5, 2), torch.ones(3, 2))
    assert out.dtype == torch.float32 and out.shape == (2,)


def test_constant_damping():
    out = ConstantDamping(0.25)(torch.ones(3, 4, dtype=torch.float64), torch.ones(2, 4))
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.full((4,), 0.25, dtype=torch.float64))
    assert isinstance(ConstantDamping(1.0), DampingStrategy)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"candidates": []}, ValueError),
        ({"candidates": [-1.0, 1.0]}, ValueError),
        ({"candidates": [float("nan")]}, ValueError),
        ({"percentile": 0.0}, ValueError),
        ({"percentile": 100.0}, ValueError),
        ({"num_resamples": 0}, ValueError),
        ({"num_resamples": 2.5}, TypeError),
        ({"generator": "seed"}, TypeError),
    ],
)
def test_bootstrap_rejects_bad_settings(kwargs, error):
    with pytest.raises(error):
        BootstrapDamping(**kwargs)


@pytest.mark.parametrize("delta, error", [(-1.0, ValueError), ("1", TypeError)])
def test_constant_rejects_bad_delta(delta, error):
    with pytest.raises(error):
        ConstantDamping(delta)


@pytest.mark.parametrize(
    "gammas, lambdas, error",
    [
        (torch.ones(3), torch.ones(3, 1), ValueError),
        (torch.ones(3, 2), torch.ones(3, 3), ValueError),
        (np.ones((3, 2)), torch.ones(3, 2), TypeError),
        (torch.ones(0, 2), torch.ones(3, 2), ValueError),
    ],
)
def test_strategies_reject_bad_derivatives(gammas, lambdas, error):
    for strategy in (ConstantDamping(1.0), BootstrapDamping(generator=0)):
        with pytest.raises(error):
            strategy(gammas, lambdas)


def test_paired_true_needs_equal_sizes():
    with pytest.raises(ValueError, match="paired"):
        BootstrapDamping(paired=True, generator=0)(torch.ones(4, 2), torch.ones(3, 2))
