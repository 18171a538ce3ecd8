"""vivitlib.linalg on plain tensors: a user-supplied V, against dense algebra."""

import pytest
import torch

from vivitlib import linalg

N, C, D = 5, 3, 40


@pytest.fixture
def factor():
    """A rank-deficient V [D, N·C] (one null direction per sample) and per-sample grads."""
    gen = torch.Generator().manual_seed(0)
    cols = torch.randn(D, N, C, generator=gen, dtype=torch.float64)
    cols[:, :, -1] = cols[:, :, 0] + cols[:, :, 1]  # rank C-1 per sample
    V = cols.reshape(D, N * C) / N**0.5
    grads = torch.randn(7, D, generator=gen, dtype=torch.float64)
    return V, grads


def test_gram_eigh_filters_zero_eigenvalues(factor):
    V, _ = factor
    evals, evecs = linalg.gram_eigh(linalg.gram_matrix(V))
    G = V @ V.T
    dense = torch.linalg.eigvalsh(G).flip(0)
    assert evals.numel() == N * (C - 1)
    torch.testing.assert_close(evals, dense[: N * (C - 1)], rtol=1e-10, atol=0)
    assert (evals[:-1] >= evals[1:]).all()
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(evals.numel(), dtype=V.dtype))


def test_threshold_is_relative_and_documented():
    gram = torch.diag(torch.tensor([1.0, 1e-3, 1e-17], dtype=torch.float64))
    evals, _ = linalg.gram_eigh(gram)
    assert evals.tolist() == [1.0, 1e-3]
    assert linalg.default_rtol(3, torch.float64) == 3 * torch.finfo(torch.float64).eps
    evals, _ = linalg.gram_eigh(gram, rtol=1e-2)
    assert evals.tolist() == [1.0]
    evals, _ = linalg.gram_eigh(torch.zeros(3, 3))
    assert evals.numel() == 0


def test_lift_gives_ggn_eigenvectors(factor):
    V, _ = factor
    evals, gvecs = linalg.gram_eigh(linalg.gram_matrix(V))
    E = linalg.lift(V, gvecs, evals)
    G = V @ V.T
    torch.testing.assert_close(G @ E, E * evals, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(E.T @ E, torch.eye(evals.numel(), dtype=V.dtype))


def test_directional_derivatives(factor):
    V, grads = factor
    evals, gvecs = linalg.gram_eigh(linalg.gram_matrix(V))
    E = linalg.lift(V, gvecs, evals)
    gammas = linalg.directional_gammas(V.T @ grads.T, gvecs, evals)
    torch.testing.assert_close(gammas, grads @ E, rtol=1e-9, atol=1e-10)
    lambdas = linalg.directional_lambdas(gvecs, evals, N)
    Vn = V.reshape(D, N, C)
    per_sample = N * torch.einsum("dnc,enc->nde", Vn, Vn)  # G_n, mean = G
    expected = torch.einsum("dk,nde,ek->nk", E, per_sample, E)
    torch.testing.assert_close(lambdas, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lambdas.mean(0), evals)
    snr = linalg.signal_to_noise(gammas)
    torch.testing.assert_close(snr, gammas.mean(0) ** 2 / gammas.var(0))
    g = grads.mean(0)
    overlaps = linalg.gradient_overlaps(g @ E, g @ g)
    assert 0 <= overlaps.sum() <= 1


def test_newton_step(factor):
    V, grads = factor
    g = grads.mean(0)
    evals, gvecs = linalg.gram_eigh(linalg.gram_matrix(V))
    E = linalg.lift(V, gvecs, evals)
    G = V @ V.T
    P = E @ E.T
    for damping in (0.0, 0.3):
        step = linalg.newton_step(V, gvecs, evals, E.T @ g, damping)
        expected = -P @ torch.linalg.pinv(G + damping * P) @ P @ g
        torch.testing.assert_close(step, expected, rtol=1e-7, atol=1e-9)
    inf_all = torch.full((evals.numel(),), float("inf"))
    assert linalg.newton_step(V, gvecs, evals, E.T @ g, inf_all).abs().max() == 0
