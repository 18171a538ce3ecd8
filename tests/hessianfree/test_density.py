"""Stochastic Lanczos quadrature against exact smoothed densities."""

import math

import pytest
import torch

from tests.hessianfree.cases import CASES, DENSE, make_problem
from vivitlib import hessianfree as hf


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _exact(points, grid, sigma):
    return hf.smooth(points, torch.full_like(points, 1 / len(points)), grid, sigma)


def _l1(a, b, grid):
    return torch.trapezoid((a - b).abs(), grid).item()


def _sigma(sd):
    return math.sqrt(sd.kernel_var) * 0.5 * (sd.range[1] - sd.range[0])


@pytest.fixture
def diagonal():
    evals = torch.cat(
        [torch.tensor([12.0, 9.0, 6.5]), torch.linspace(-0.8, 1.5, 37)]
    ).double()
    return torch.diag(evals), evals


def test_diagonal_full_lanczos_is_exact(diagonal):
    # Rademacher probes have (e_i^T z)^2 = 1: the quadrature is exact
    A, evals = diagonal
    sd = hf.spectral_density(
        A,
        num_iters=40,
        num_probes=2,
        kernel_var=1e-3,
        deflate=0,
        num_points=4000,
        generator=_gen(),
    )
    assert sd.num_products == 80 and sd.weights.sum().item() == pytest.approx(1.0)
    exact = _exact(evals, sd.grid, _sigma(sd))
    assert _l1(sd.density, exact, sd.grid) < 1e-8
    assert torch.trapezoid(sd.density, sd.grid).item() == pytest.approx(1.0, abs=1e-6)
    assert sd.range[0] < evals.min() and sd.range[1] > evals.max()
    # re-smoothing with another kernel
    wide = sd.smooth(kernel_var=1e-2)
    exact_wide = _exact(
        evals, sd.grid, math.sqrt(1e-2) * 0.5 * (sd.range[1] - sd.range[0])
    )
    assert _l1(wide, exact_wide, sd.grid) < 1e-8


def test_log_density_is_exact_on_diagonal(diagonal):
    A, evals = diagonal
    sd = hf.spectral_density(
        A,
        num_iters=40,
        num_probes=1,
        log=True,
        log_eps=1e-6,
        deflate=0,
        kernel_var=1e-3,
        num_points=4000,
        generator=_gen(),
    )
    assert sd.log
    points = torch.log(evals.abs() + 1e-6)
    assert sd.range[0] < points.min() and sd.range[1] > points.max()
    exact = _exact(points, sd.grid, _sigma(sd))
    assert _l1(sd.density, exact, sd.grid) < 1e-8


def test_deflation_removes_outliers(diagonal):
    A, evals = diagonal
    sd = hf.spectral_density(
        A,
        num_iters=37,
        num_probes=1,
        deflate=3,
        kernel_var=1e-3,
        num_points=4000,
        generator=_gen(),
    )
    torch.testing.assert_close(sd.deflated, evals[:3], rtol=1e-3, atol=0)
    assert sd.weights.sum().item() == pytest.approx(1.0)
    assert sd.weights[:3].tolist() == pytest.approx([1 / 40] * 3)
    exact = _exact(evals, sd.grid, _sigma(sd))
    assert _l1(sd.density, exact, sd.grid) < 1e-2


def test_operator_density_converges_to_exact():
    problem = make_problem(CASES[0])
    op = hf.HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.y))
    evals = torch.linalg.eigvalsh(DENSE["hessian"](problem))
    errors = []
    for probes in (4, 64):
        sd = hf.spectral_density(
            op,
            num_iters=20,
            num_probes=probes,
            deflate=0,
            kernel_var=1e-3,
            generator=_gen(1),
        )
        exact = _exact(evals, sd.grid, _sigma(sd))
        errors.append(_l1(sd.density, exact, sd.grid))
    # probe noise shrinks like 1/sqrt(probes): 4x fewer error expected
    assert errors[1] < 0.2 and errors[1] < 0.5 * errors[0]
    # quadrature moments: weighted mean of nodes is Hutchinson's tr(H)/D
    assert (
        abs((sd.weights @ sd.nodes).item() - evals.mean().item())
        < 0.2 * evals.abs().mean().item()
    )


def test_no_reorthogonalization_and_reproducibility(diagonal):
    A, evals = diagonal
    a = hf.spectral_density(
        A,
        num_iters=15,
        num_probes=3,
        reorthogonalize=False,
        deflate=0,
        generator=_gen(3),
    )
    b = hf.spectral_density(
        A,
        num_iters=15,
        num_probes=3,
        reorthogonalize=False,
        deflate=0,
        generator=_gen(3),
    )
    assert torch.equal(a.density, b.density) and a.num_products == 45
    # default deflation: min(20, D - num_iters) = 20 outliers at weight 1/D each
    c = hf.spectral_density(A, num_iters=15, num_probes=2, generator=_gen(3))
    top = hf.topk_eigh(A, 20, generator=_gen(3))  # the deflation, run alone
    torch.testing.assert_close(c.deflated, top.evals, rtol=0, atol=0)
    assert c.num_products == top.num_products + 2 * 15
    torch.testing.assert_close(
        c.deflated[:3], torch.tensor([12.0, 9.0, 6.5]).double(), rtol=1e-3, atol=0
    )
    assert a.weights.sum().item() == pytest.approx(1.0)


def test_density_bad_inputs(diagonal):
    A, _ = diagonal
    with pytest.raises(ValueError, match="num_iters must be at most"):
        hf.spectral_density(A, num_iters=41)
    with pytest.raises(ValueError, match="deflate must be smaller"):
        hf.spectral_density(A, num_iters=3, deflate=40)
    with pytest.raises(ValueError, match="kernel_var must be a finite positive"):
        hf.spectral_density(A, num_iters=3, kernel_var=-1.0)
    with pytest.raises(TypeError, match="num_probes must be an int"):
        hf.spectral_density(A, num_iters=3, num_probes=2.5)
