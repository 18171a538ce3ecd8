"""LowRankGGN against an independent dense float64 reference (torch.func)."""

import pytest
import torch

import vivitlib
from tests.core.helpers import assert_eigenpairs, flat_evecs


def _collect(problem, **kwargs):
    ggn = vivitlib.LowRankGGN(problem.params, **kwargs)
    problem.run(ggn)
    return ggn


def test_eigenpairs(problem):
    ggn = _collect(problem)
    assert_eigenpairs(ggn.blocks[0], problem.dense().ggn)


def test_gram_is_sample_major(problem):
    block = _collect(problem).blocks[0]
    dense = problem.dense()
    n = len(dense.per_sample_grads)  # samples the loss counts
    assert block.num_curv_samples == n
    assert block.gram.shape[0] % n == 0
    # trace of the Gram equals trace of G
    torch.testing.assert_close(
        block.gram.trace(), dense.ggn.trace(), rtol=1e-10, atol=0
    )
    assert torch.allclose(block.gram, block.gram.T)


def test_directional_derivatives(problem):
    block = _collect(problem).blocks[0]
    dense = problem.dense()
    E = flat_evecs(block)
    gammas = dense.per_sample_grads @ E.T
    lambdas = torch.einsum("kd,nde,ke->nk", E, dense.per_sample_ggn, E)
    scale_g = gammas.abs().max()
    torch.testing.assert_close(block.gammas, gammas, atol=1e-9 * scale_g, rtol=1e-7)
    torch.testing.assert_close(
        block.lambdas, lambdas, atol=1e-9 * block.evals[0], rtol=1e-7
    )
    torch.testing.assert_close(
        block.gamma_means, gammas.mean(0), atol=1e-9 * scale_g, rtol=1e-7
    )
    # batch quantities: batch_scale times the means of the per-sample ones
    assert block.batch_scale == pytest.approx(dense.batch_scale, rel=1e-10)
    scale_b = (E @ dense.grad).abs().max()
    torch.testing.assert_close(
        block.batch_gammas, E @ dense.grad, atol=1e-9 * scale_b, rtol=1e-7
    )
    torch.testing.assert_close(
        block.lambda_means * block.batch_scale, block.evals, rtol=1e-9, atol=0
    )
    # derived statistics
    torch.testing.assert_close(
        block.gamma_snr, gammas.mean(0) ** 2 / gammas.var(0), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        block.gradient_overlaps, (E @ dense.grad) ** 2 / dense.grad.pow(2).sum(),
        rtol=1e-6, atol=1e-12,
    )  # fmt: skip
    assert block.gradient_overlaps.sum() <= 1 + 1e-9


def test_grad_equals_plain_backward_and_no_buffers_left(problem):
    problem.loss_fn(problem.model(problem.X), problem.y).backward()
    plain = [p.grad.clone() for p in problem.params]
    for p in problem.params:
        p.grad = None
    _collect(problem)
    for p, g in zip(problem.params, plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
        leftovers = [k for k in vars(p) if k.startswith("_vivitlib")]
        assert not leftovers


def test_newton_step_matches_dense(problem):
    block = _collect(problem).blocks[0]
    dense = problem.dense()
    evals, evecs = torch.linalg.eigh(dense.ggn)
    keep = evals > 1e-9 * evals.max()
    U, lam = evecs[:, keep], evals[keep]
    for damping in (0.0, 0.1):
        step = torch.cat([s.flatten() for s in block.newton_step(damping)])
        expected = -U @ ((U.T @ dense.grad) / (lam + damping))
        torch.testing.assert_close(
            step, expected, rtol=1e-6, atol=1e-9 * expected.abs().max()
        )
    # per-direction damping with 'inf' skips the direction
    delta = torch.zeros(block.num_directions, dtype=torch.float64)
    delta[0] = float("inf")
    step = torch.cat([s.flatten() for s in block.newton_step(delta)])
    e0 = flat_evecs(block, 1)[0]
    assert abs(float(step @ e0)) < 1e-9 * float(step.norm() + 1)


def test_factored_and_dense_paths_agree(problem):
    from vivitlib.factors import cost_model

    results = []
    for choice in (True, False):
        with cost_model(factored=choice):
            block = _collect(problem).blocks[0]
            results.append((block.evals, block.gammas, flat_evecs(block, 3)))
        for p in problem.params:
            p.grad = None
    (ev1, g1, e1), (ev2, g2, e2) = results
    torch.testing.assert_close(ev1, ev2, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g1.abs(), g2.abs(), rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(
        (e1 * e2).sum(1).abs(), torch.ones(len(e1), dtype=e1.dtype), rtol=0, atol=1e-8
    )
