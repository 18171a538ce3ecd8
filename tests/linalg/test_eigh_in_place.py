"""``gram_eigh`` in place (LAPACK ``?syevd`` of torch's own library, issue 13).

Against ``torch.linalg.eigvalsh`` / ``eigh`` (float64) on random PSD matrices,
full-rank and rank-deficient: the same routine with the same arguments, so
the same numbers; what ``overwrite`` may change and how the matrix is rebuilt.
"""

import pytest
import torch

from vivitlib import linalg
from vivitlib.linalg import _lapack
from vivitlib.linalg.gram import mirror_upper_

SIZES = [1, 2, 7, 60, 301]


def _psd(M: int, rank: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """``VᵀV`` of a random ``[rank, M]`` factor, exactly symmetric."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(rank, M, generator=g, dtype=torch.float64)
    gram = V.T @ V
    return ((gram + gram.T) / 2).to(dtype)


def _ranks(M: int) -> list[int]:
    return sorted({M, max(1, M - M // 5), max(1, M // 3)})


def _cases():
    return [(M, r) for M in SIZES for r in _ranks(M)]


def _cut(evals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ascending eigenvalues → kept ones, descending, by the library's rule."""
    tol = linalg.eigenvalue_cutoff(evals, factor_dtype=dtype, eigh_dtype=dtype)
    return evals[evals > tol].flip(0)


needs_lapack = pytest.mark.skipif(
    _lapack.syevd_routine(torch.float64) is None,
    reason="torch's library exports no ?syevd here (the torch path is used)",
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("M", "rank"), _cases())
def test_eigenvalues_in_place_equal_eigvalsh(M, rank, dtype):
    gram = _psd(M, rank, dtype)
    expected = _cut(torch.linalg.eigvalsh(gram), dtype)
    work = gram.clone()
    evals, none = linalg.gram_eigh(
        work, dtype=dtype, eigenvectors=False, overwrite=True
    )
    assert none is None
    assert evals.dtype == dtype
    assert torch.equal(evals, expected)  # same routine, same arguments
    # only the upper triangle and the diagonal may have changed
    assert torch.equal(work.tril(-1), gram.tril(-1))
    # ... and the strict lower triangle with the diagonal rebuilds the matrix
    mirror_upper_(work.T)
    work.diagonal().copy_(gram.diagonal())
    assert torch.equal(work, gram)


@needs_lapack
def test_eigenvalues_in_place_use_the_matrix_as_workspace():
    gram = _psd(40, 40)
    work = gram.clone()
    linalg.gram_eigh(work, eigenvectors=False, overwrite=True)
    assert not torch.equal(work.triu(), gram.triu())  # it was the workspace


@pytest.mark.parametrize(("M", "rank"), _cases())
def test_eigenpairs_in_place_equal_eigh(M, rank):
    gram = _psd(M, rank)
    ref_evals, ref_evecs = torch.linalg.eigh(gram)
    expected = _cut(ref_evals, torch.float64)
    K = expected.numel()
    work = gram.clone()
    evals, evecs = linalg.gram_eigh(work, overwrite=True)
    assert torch.equal(evals, expected)
    assert torch.equal(evecs, ref_evecs.flip(1)[:, :K])
    # independent of the solver: G e = λ e and orthonormal columns
    residual = gram @ evecs - evecs * evals
    assert residual.abs().max() <= 1e-10 * max(float(evals[0]), 1.0)
    eye = torch.eye(K, dtype=torch.float64)
    torch.testing.assert_close(evecs.T @ evecs, eye, rtol=0, atol=1e-12)


@needs_lapack
def test_most_eigenvectors_kept_share_the_matrix_memory():
    gram = _psd(50, 50)
    work = gram.clone()
    evals, evecs = linalg.gram_eigh(work, overwrite=True)
    assert evals.numel() == 50
    # no second [M, M] buffer: the eigenvectors are a view of the input's memory
    assert evecs.untyped_storage().data_ptr() == work.data_ptr()
    assert evecs.T.is_contiguous()


def test_few_eigenvectors_kept_are_a_fresh_small_tensor():
    gram = _psd(60, 10)
    evals, evecs = linalg.gram_eigh(gram.clone(), overwrite=True)
    ref_evals, ref_evecs = torch.linalg.eigh(gram)
    assert evals.numel() == 10
    assert evecs.is_contiguous() and evecs.shape == (60, 10)
    assert torch.equal(evecs, ref_evecs.flip(1)[:, :10])


@pytest.mark.parametrize("eigenvectors", [False, True])
def test_without_overwrite_the_input_is_unchanged(eigenvectors):
    gram = _psd(30, 20)
    before = gram.clone()
    linalg.gram_eigh(gram, eigenvectors=eigenvectors)
    assert torch.equal(gram, before)


@pytest.mark.parametrize("eigenvectors", [False, True])
def test_float32_solver_and_transposed_input_copy_once(eigenvectors):
    gram = _psd(30, 20)
    before = gram.clone()
    evals, evecs = linalg.gram_eigh(
        gram,
        dtype=torch.float32,
        factor_dtype=torch.float32,
        eigenvectors=eigenvectors,
        overwrite=True,
    )
    assert torch.equal(gram, before)  # dtypes differ: decomposed on a copy
    if eigenvectors:
        ref_evals, ref_evecs = torch.linalg.eigh(gram.float())
        expected = _cut(ref_evals, torch.float32)
        assert torch.equal(evecs, ref_evecs.flip(1)[:, : expected.numel()])
    else:
        expected = _cut(torch.linalg.eigvalsh(gram.float()), torch.float32)
    assert torch.equal(evals, expected)
    transposed = gram.T  # not contiguous: decomposed on a copy too
    evals64, _ = linalg.gram_eigh(transposed, eigenvectors=False, overwrite=True)
    assert torch.equal(gram, before)
    expected64 = _cut(torch.linalg.eigvalsh(gram), torch.float64)
    torch.testing.assert_close(evals64, expected64, rtol=1e-12, atol=0)


@pytest.mark.parametrize("eigenvectors", [False, True])
def test_torch_path_when_no_lapack_routine_is_found(monkeypatch, eigenvectors):
    gram = _psd(40, 30)
    expected = linalg.gram_eigh(gram, eigenvectors=eigenvectors)
    monkeypatch.setattr(_lapack, "syevd_routine", lambda dtype: None)
    work = gram.clone()
    got = linalg.gram_eigh(work, eigenvectors=eigenvectors, overwrite=True)
    assert torch.equal(work, gram)  # torch's path copies
    assert torch.equal(got[0], expected[0])
    if eigenvectors:
        assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("eigenvectors", [False, True])
def test_the_environment_switch_turns_the_in_place_path_off(monkeypatch, eigenvectors):
    gram = _psd(40, 30)
    expected = linalg.gram_eigh(gram, eigenvectors=eigenvectors)
    monkeypatch.setenv(_lapack.SWITCH, "0")
    work = gram.clone()
    got = linalg.gram_eigh(work, eigenvectors=eigenvectors, overwrite=True)
    assert torch.equal(work, gram)  # torch's path copies
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)


def test_non_finite_gram_is_refused_before_anything_changes():
    gram = _psd(6, 6)
    gram[2, 3] = gram[3, 2] = float("nan")
    before = gram.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        linalg.gram_eigh(gram, eigenvectors=False, overwrite=True)
    assert torch.equal(gram.nan_to_num(), before.nan_to_num())
    huge = torch.full((3, 3), 5e307, dtype=torch.float64)  # finite, sum overflows
    evals, _ = linalg.gram_eigh(huge, eigenvectors=False)
    torch.testing.assert_close(evals, torch.tensor([1.5e308], dtype=torch.float64))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("eigenvectors", [False, True])
def test_a_tracked_gram_stays_differentiable(overwrite, eigenvectors):
    V = _random_factor(9, 6).requires_grad_(True)
    evals, evecs = linalg.gram_eigh(
        V.T @ V, eigenvectors=eigenvectors, overwrite=overwrite
    )
    assert evals.numel() == 6  # every pair kept: the in-place reversal's case
    evals.sum().backward()  # Σ λ = tr(VᵀV) = ‖V‖²: gradient 2 V
    torch.testing.assert_close(V.grad, 2 * V.detach(), rtol=1e-12, atol=1e-12)
    if eigenvectors:
        gram = (V.T @ V).detach()
        torch.testing.assert_close(
            gram @ evecs.detach(), evecs.detach() * evals.detach(), atol=1e-10, rtol=0
        )


def _random_factor(rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64)
