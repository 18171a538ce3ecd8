"""``gram_eigh`` against float64 ``torch.linalg.eigh`` on hard spectra (issue 13).

Spectra with clusters, tiny and exactly zero eigenvalues, built from a known
orthogonal basis so that the reference is independent of the solver.
"""

import pytest
import torch

from vivitlib import linalg


def _spectrum(kind: str, M: int) -> torch.Tensor:
    """Eigenvalues ``[M]`` of a named test spectrum (``λ_max = 1``)."""
    g = torch.Generator().manual_seed(3)
    if kind == "clustered":  # 3 clusters of near-equal values, then a tail
        base = torch.tensor([1.0] * 5 + [0.3] * 7 + [1e-3] * 6, dtype=torch.float64)
        base = base * (1 + 1e-13 * torch.rand(base.numel(), generator=g))
        tail = torch.logspace(-4, -9, M - base.numel(), dtype=torch.float64)
        return torch.cat([base, tail]).clamp_max(1.0)
    if kind == "tiny":  # decades of decay, then round-off-sized and zero ones
        head = torch.logspace(0, -11, M - 12, dtype=torch.float64)
        return torch.cat([head, torch.full((6,), 1e-17), torch.zeros(6)])
    if kind == "rank-deficient":  # one exact zero per 'sample' (cross-entropy)
        values = torch.rand(M, generator=g, dtype=torch.float64) ** 4
        values[::5] = 0.0
        return values / values.max()
    raise ValueError(kind)


def _matrix(evals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag(λ) Qᵀ`` (symmetrised) and ``Q``, for a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(0)
    M = evals.numel()
    Q, _ = torch.linalg.qr(torch.randn(M, M, generator=g, dtype=torch.float64))
    A = (Q * evals) @ Q.T
    return (A + A.T) / 2, Q


def _reference(gram: torch.Tensor, rtol: float | None):
    """Float64 ``eigh``, descending, cut exactly as the contract says."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    if rtol is None:
        tol = linalg.eigenvalue_cutoff(
            evals, factor_dtype=torch.float64, eigh_dtype=torch.float64
        )
    else:
        tol = rtol * float(evals[0])
    keep = evals > tol
    return evals[keep], evecs[:, keep]


KINDS = ["clustered", "tiny", "rank-deficient"]


@pytest.mark.parametrize("rtol", [None, 1e-6], ids=["auto-cutoff", "rtol"])
@pytest.mark.parametrize("kind", KINDS)
def test_eigenpairs_equal_float64_eigh(kind, rtol):
    gram, _ = _matrix(_spectrum(kind, 60))
    evals, evecs = linalg.gram_eigh(gram, rtol=rtol)
    ref_evals, ref_evecs = _reference(gram, rtol)
    assert evals.shape == ref_evals.shape  # the kept K is identical
    assert evals.dtype == evecs.dtype == torch.float64
    assert torch.all(evals[:-1] >= evals[1:])
    # same solver call: identical numbers (eigenvectors up to nothing, not even sign)
    assert torch.equal(evals, ref_evals)
    assert torch.equal(evecs, ref_evecs)
    assert evecs.is_contiguous() or evecs.T.is_contiguous()


@pytest.mark.parametrize("kind", KINDS)
def test_eigenpairs_match_the_constructed_spectrum(kind):
    true = _spectrum(kind, 60)
    gram, Q = _matrix(true)
    evals, evecs = linalg.gram_eigh(gram)
    true_desc, order = true.sort(descending=True)
    K = evals.numel()
    # eigenvalues: backward error of float64 eigh, ≤ a few ε·λ_max (Weyl)
    err = (evals - true_desc[:K]).abs().max()
    assert err <= 50 * torch.finfo(torch.float64).eps
    big = true_desc[:K] > 1e-6
    rel = ((evals - true_desc[:K]).abs() / true_desc[:K])[big]
    assert rel.max() <= 1e-8
    # eigenvectors: orthonormal, G e = λ e, and spanning the true eigenspaces
    eye = torch.eye(K, dtype=torch.float64)
    torch.testing.assert_close(evecs.T @ evecs, eye, rtol=0, atol=1e-12)
    residual = (gram @ evecs - evecs * evals).norm(dim=0)
    assert residual.max() <= 1e-13
    for value in true_desc[:K][big].unique():  # one projector per (cluster) value
        in_true = (true - value).abs() <= 1e-12 * max(float(value), 1e-300)
        in_found = (evals - value).abs() <= 1e-9 * float(value)
        P_true = Q[:, in_true] @ Q[:, in_true].T
        P_found = evecs[:, in_found] @ evecs[:, in_found].T
        torch.testing.assert_close(P_found, P_true, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_eigenvalues_only_keep_the_same_set(kind):
    gram, _ = _matrix(_spectrum(kind, 60))
    evals, none = linalg.gram_eigh(gram, eigenvectors=False)
    ref_evals, _ = _reference(gram, None)
    assert none is None
    assert evals.shape == ref_evals.shape
    torch.testing.assert_close(evals, ref_evals, rtol=1e-12, atol=1e-15)


def test_nothing_kept_gives_empty_results():
    evals, evecs = linalg.gram_eigh(torch.zeros(4, 4, dtype=torch.float64))
    assert evals.shape == (0,)
    assert evecs.shape == (4, 0)
