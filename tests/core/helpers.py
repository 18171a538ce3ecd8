"""Assertions and runners shared by the core tests."""

import warnings

import torch

import vivitlib
from tests.reference import eigh_desc
from vivitlib.extensions import layers
from vivitlib.memory import MemoryBudgetWarning


def flat_evecs(block, k=None) -> torch.Tensor:
    """Eigenvectors of a block as rows ``[k, D]``."""
    return torch.cat([e.flatten(1) for e in block.evecs(k)], dim=1)


def assert_eigenpairs(block, dense_ggn, rtol=1e-6):
    """Eigenvalues match dense ones; eigenvectors span the same eigenspaces."""
    evals, evecs = eigh_desc(dense_ggn)
    K = block.num_directions
    scale = evals[0]
    # every dense eigenvalue above the threshold is found, and nothing else
    assert (evals[K:].abs() <= 1e-8 * scale).all(), "missed a nontrivial eigenvalue"
    torch.testing.assert_close(block.evals, evals[:K], rtol=rtol, atol=1e-10 * scale)
    E = flat_evecs(block)
    torch.testing.assert_close(E @ E.T, torch.eye(K, dtype=E.dtype), atol=1e-8, rtol=0)
    torch.testing.assert_close(
        E @ dense_ggn, block.evals[:, None] * E, atol=1e-8 * scale, rtol=0
    )
    # projector onto each (possibly degenerate) eigenspace agrees with dense
    start = 0
    while start < K:
        stop = start + 1
        while stop < K and evals[stop] > evals[start] * (1 - 1e-6):
            stop += 1
        P = E[start:stop].T @ E[start:stop]
        Q = evecs[:, start:stop] @ evecs[:, start:stop].T
        torch.testing.assert_close(P, Q, atol=1e-6, rtol=0)
        start = stop


def assert_block_matches_dense(block, dense, damping: float = 0.1) -> None:
    """Eigenpairs, per-sample γ and λ and the damped Newton step vs the reference.

    ``dense`` is :meth:`tests.core.cases.Problem.dense` (float64, ``torch.func``).
    """
    assert_eigenpairs(block, dense.ggn)
    E = flat_evecs(block)
    gammas = dense.per_sample_grads @ E.T
    lambdas = torch.einsum("kd,nde,ke->nk", E, dense.per_sample_ggn, E)
    tol = 1e-9 * gammas.abs().max()
    torch.testing.assert_close(block.gammas, gammas, atol=tol, rtol=1e-7)
    tol = 1e-9 * block.evals[0]
    torch.testing.assert_close(block.lambdas, lambdas, atol=tol, rtol=1e-7)
    step = torch.cat([s.flatten() for s in block.newton_step(damping)])
    expected = -E.T @ ((E @ dense.grad) / (block.evals + damping))
    tol = 1e-9 * expected.abs().max()
    torch.testing.assert_close(step, expected, rtol=1e-6, atol=tol)


def quiet_blocks(problem, collector):
    """Run ``collector`` on ``problem`` without budget warnings; its blocks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        problem.run(collector)
    return collector.blocks


def layerwise_results(problem, run=quiet_blocks, **options):
    """``(evals, gammas, lambdas, eigenvectors)`` per layer of a seeded pass."""
    ggn = vivitlib.LowRankGGN(
        vivitlib.layerwise_groups(problem.model),
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    blocks = run(problem, ggn)
    return [(b.evals, b.gammas, b.lambdas, flat_evecs(b)) for b in blocks]


def spy_unfolding(monkeypatch):
    """Record the samples of every unfolded input formed (whole or a block)."""
    formed = []
    real = layers.unfold_input

    def spy(module, x):
        formed.append(x.shape[0])
        return real(module, x)

    monkeypatch.setattr(layers, "unfold_input", spy)
    return formed
