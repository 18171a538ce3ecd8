"""Lanczos, top-k eigenpairs, trace and sketch against dense references."""

import pytest
import torch

from tests.hessianfree.cases import CASES, DENSE, make_problem
from vivitlib import hessianfree as hf


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def hessian_case():
    problem = make_problem(CASES[0])
    op = hf.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    return op, DENSE["hessian"](problem)


def _spiked(D=60, seed=0):
    """Dense symmetric matrix with 5 outliers, a bulk and a negative edge."""
    g = _gen(seed)
    evals = torch.cat(
        [
            torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0]),
            0.3 * torch.randn(D - 6, generator=g, dtype=torch.float64),
            torch.tensor([-2.0]),
        ]
    ).double()
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return Q @ torch.diag(evals) @ Q.T, torch.sort(evals, descending=True).values


# ---- lanczos ---------------------------------------------------------------
@pytest.mark.parametrize("reorth", [True, False])
def test_lanczos_relations(hessian_case, reorth):
    op, dense = hessian_case
    m = 12
    res = hf.lanczos(op, m, reorthogonalize=reorth, generator=_gen())
    assert res.num_products == m and res.alphas.shape == (m,)
    assert res.betas.shape == (m - 1,)
    if not reorth:
        assert res.basis is None
        ref = hf.lanczos(dense, m, generator=_gen())
        torch.testing.assert_close(res.alphas[:6], ref.alphas[:6], rtol=1e-6, atol=1e-8)
        return
    Q, T = res.basis, res.tridiagonal
    torch.testing.assert_close(
        Q.T @ Q, torch.eye(m, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(Q.T @ dense @ Q, T, atol=1e-10, rtol=1e-10)
    resid = dense @ Q - Q @ T
    # A Q - Q T = beta_m q_{m+1} e_m^T: only the last column is non-zero
    assert resid[:, :-1].abs().max() < 1e-10
    assert abs(resid[:, -1].norm().item() - res.residual_norm) < 1e-10


def test_lanczos_full_run_recovers_spectrum_and_breakdown():
    A, evals = _spiked(30)
    res = hf.lanczos(A, 30, generator=_gen(1))
    torch.testing.assert_close(res.ritz()[0].flip(0), evals, atol=1e-10, rtol=1e-10)
    low_rank = A[:, :3] @ A[:, :3].T  # rank 3
    res = hf.lanczos(low_rank, 10, generator=_gen())
    assert res.breakdown and res.num_products == 4  # rank 3 + null direction


def test_lanczos_bad_inputs(hessian_case):
    op, _ = hessian_case
    with pytest.raises(ValueError, match="at most D"):
        hf.lanczos(op, op.shape[0] + 1)
    with pytest.raises(ValueError, match="v0 must be"):
        hf.lanczos(op, 3, v0=torch.ones(2))
    with pytest.raises(TypeError, match="torch.Generator"):
        hf.lanczos(op, 3, generator=0)
    with pytest.raises(TypeError, match="square linear operator"):
        hf.lanczos(lambda v: v, 3)


# ---- top-k eigenpairs -----------------------------------------------------
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_topk_eigh_operator(hessian_case, which):
    op, dense = hessian_case
    exact = torch.linalg.eigvalsh(dense)
    key = {"largest": exact, "smallest": -exact, "magnitude": exact.abs()}[which]
    want = torch.sort(
        exact[torch.argsort(key, descending=True)[:3]], descending=True
    ).values
    res = hf.topk_eigh(op, 3, which=which, tol=1e-8, generator=_gen())
    assert res.converged
    torch.testing.assert_close(res.evals, want, rtol=1e-7, atol=1e-10)
    evals, evecs = res
    assert [e.shape for e in evecs] == [(3, *p.shape) for p in op.params]
    V = res.flat_evecs
    torch.testing.assert_close(op.flatten(evecs), V, rtol=0, atol=0)
    torch.testing.assert_close(
        V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0
    )
    torch.testing.assert_close(dense @ V, V * evals, atol=1e-5, rtol=0)
    assert ((res.evals - want).abs() <= res.error_bounds + 1e-12).all()


def test_topk_eigh_tolerance_bound_is_honest():
    A, evals = _spiked(200, seed=3)
    for tol in (1e-2, 1e-4):
        res = hf.topk_eigh(A, 5, tol=tol, generator=_gen())
        rel = (res.evals - evals[:5]).abs() / evals[:5].abs()
        assert res.converged and (rel <= tol).all()
        assert ((res.evals - evals[:5]).abs() <= res.error_bounds + 1e-12).all()


def test_topk_eigh_thick_restart_and_invariant_subspace():
    A, evals = _spiked(120, seed=4)
    res = hf.topk_eigh(A, 4, tol=1e-8, max_basis=8, generator=_gen())
    assert res.num_restarts > 0 and res.converged
    torch.testing.assert_close(res.evals, evals[:4], rtol=1e-7, atol=1e-9)
    # block-diagonal matrix with a start vector inside one block: the Krylov
    # space is invariant, the solver must continue in the other block
    B = torch.block_diag(
        torch.diag(torch.tensor([1.0, 2.0])), torch.diag(torch.tensor([5.0, 3.0, 0.5]))
    ).double()
    res = hf.topk_eigh(B, 2, tol=1e-10, v0=torch.tensor([1.0, 1, 0, 0, 0]))
    torch.testing.assert_close(res.evals, torch.tensor([5.0, 3.0]).double())


def test_power_iteration_matches_top_eigenvalues():
    A, evals = _spiked(60)
    res = hf.power_iteration(A, 2, tol=1e-8, max_iters=500, generator=_gen())
    assert res.converged
    torch.testing.assert_close(res.evals, evals[:2], rtol=1e-4, atol=0)
    assert res.num_products > 2


def test_topk_eigh_reproducible_and_bad_inputs(hessian_case):
    op, _ = hessian_case
    a = hf.topk_eigh(op, 2, generator=_gen(5))
    b = hf.topk_eigh(op, 2, generator=_gen(5))
    assert torch.equal(a.evals, b.evals)
    with pytest.raises(ValueError, match="which must be"):
        hf.topk_eigh(op, 2, which="top")
    with pytest.raises(ValueError, match="k must be at most"):
        hf.topk_eigh(op, op.shape[0] + 1)
    with pytest.raises(ValueError, match="tol must be a finite positive"):
        hf.topk_eigh(op, 2, tol=0.0)
    with pytest.warns(UserWarning, match="did not reach"):
        hf.topk_eigh(op, 2, tol=1e-14, max_products=3)


# ---- trace and sketch -------------------------------------------------------
@pytest.mark.parametrize("method", ["krylov", "hutch++", "hutchinson"])
def test_trace_unbiased_with_confidence(hessian_case, method):
    op, dense = hessian_case
    exact = torch.trace(dense).item()
    est = hf.hutchinson_trace(op, 30, method=method, generator=_gen())
    assert est.num_products == 30 and est.method == method
    assert abs(est.estimate - exact) <= 5 * est.std_error + 1e-10
    lo, hi = est.confidence_interval
    assert lo <= est.estimate <= hi


def test_trace_exact_when_deflation_spans_range():
    problem = make_problem(CASES[1])
    problem.X, problem.y = problem.X[:3], problem.y[:3]  # GGN rank <= 3 * 2
    op = hf.GGNOperator(problem.model, problem.loss_fn, problem.batches)
    exact = torch.trace(DENSE["ggn"](problem)).item()
    est = hf.hutchinson_trace(op, 12, num_deflation=8, generator=_gen())
    assert abs(est.estimate - exact) < 1e-9 * abs(exact)
    diag = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    est = hf.hutchinson_trace(diag, 4, method="hutchinson")
    assert est.estimate == pytest.approx(55.0, abs=1e-12)  # Rademacher: exact


def test_trace_bad_inputs(hessian_case):
    op, _ = hessian_case
    with pytest.raises(ValueError, match="method must be"):
        hf.hutchinson_trace(op, 10, method="xtrace")
    with pytest.raises(ValueError, match="fewer than 2"):
        hf.hutchinson_trace(op, 6, method="hutch++", num_deflation=3)
    with pytest.raises(ValueError, match="confidence"):
        hf.hutchinson_trace(op, 10, confidence=1.5)


def test_sketch_matches_dense(hessian_case):
    op, dense = hessian_case
    res = hf.sketch(op, 6, generator=_gen(2))
    S = 2.0 * torch.randint(0, 2, (op.shape[0], 6), generator=_gen(2)).double() - 1
    S = S / 6**0.5
    torch.testing.assert_close(res.matrix, S.T @ dense @ S, rtol=1e-10, atol=1e-12)
    assert res.trace == pytest.approx(torch.trace(S.T @ dense @ S).item(), rel=1e-10)
    want = torch.linalg.eigvalsh(S.T @ dense @ S).flip(0)
    torch.testing.assert_close(res.evals, want, rtol=1e-10, atol=1e-12)
    assert res.num_products == 6
    with pytest.raises(ValueError, match="size must be at most"):
        hf.sketch(op, op.shape[0] + 1)


# ---- deprecated result names ------------------------------------------------
@pytest.mark.parametrize(
    "make, old, new",
    [
        (lambda A: hf.topk_eigh(A, 2, generator=_gen()), "eigenvalues", "evals"),
        (lambda A: hf.topk_eigh(A, 2, generator=_gen()), "eigenvectors", "evecs"),
        (
            lambda A: hf.power_iteration(A, 2, generator=_gen()),
            "flat_eigenvectors",
            "flat_evecs",
        ),
        (lambda A: hf.sketch(A, 3, generator=_gen()), "eigenvalues", "evals"),
    ],
)
def test_old_result_names_warn_and_give_the_same_values(make, old, new):
    res = make(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
    cls = type(res).__name__
    with pytest.warns(
        DeprecationWarning, match=rf"{cls}\.{old} is deprecated; use {cls}\.{new}"
    ) as caught:
        value = getattr(res, old)
    assert value is getattr(res, new)
    assert caught[0].filename == __file__  # points at the caller
