"""Eigen-decomposition of the Gram matrix, its round-off cut-off, and lifting."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vivitlib._checks import check_finite
from vivitlib.linalg._lapack import syevd_, syevd_applies

#: Safety factor on the observed noise floor (see :func:`eigenvalue_cutoff`).
NOISE_FLOOR_SAFETY = 2.0
#: Constant ``c`` of the eigensolver's error term ``c·√M·ε·λ_max``.
EIGH_ERROR_CONSTANT = 2.0


def default_rtol(num_columns: int, dtype: torch.dtype) -> float:
    """The textbook numerical-rank threshold ``M · ε(dtype)`` (relative to ``λ_max``).

    Far more conservative than :func:`eigenvalue_cutoff` (in float32 it drops
    directions that float32 resolves to a few per mille); kept for users who
    want the classical rule: pass ``rtol=default_rtol(M, dtype)``.

    Args:
        num_columns: Gram matrix size ``M``.
        dtype: Floating dtype the factor ``V`` was computed in.

    Returns:
        The relative threshold.
    """
    return max(num_columns, 1) * torch.finfo(dtype).eps


def eigenvalue_cutoff(
    evals: Tensor, *, factor_dtype: torch.dtype, eigh_dtype: torch.dtype
) -> float:
    r"""Absolute cut-off below which computed Gram eigenvalues are round-off.

    The Gram matrix ``VᵀV`` is positive semi-definite, so a negative computed
    eigenvalue is pure round-off; its size measures the error the whole
    computation had (the factor's dtype, the Gram contraction and the
    eigensolver). The cut-off is

    .. math::
        τ = \max\bigl(s · |\min(λ_{\min}, 0)|,\;
                      c \sqrt{M} ε_{\rm eigh} λ_{\max},\;
                      [λ_{\min} ≥ 0] · ε_{\rm factor} · λ_{\max}\bigr)

    with safety ``s = 2`` (:data:`NOISE_FLOOR_SAFETY`) and ``c = 2``
    (:data:`EIGH_ERROR_CONSTANT`), ``M`` the Gram size. The first term is the
    observed noise floor (available whenever the Gram matrix is rank-deficient);
    the second is the eigensolver's backward error (Weyl: ``|λ̂ - λ| ≤ ‖E‖``,
    and Householder tridiagonalisation has ``‖E‖ ≲ √M ε ‖G‖`` in practice);
    the third is an a-priori bound used only when no negative eigenvalue shows
    the noise (full-rank Gram): a factor with relative error ``ε`` per entry
    moves every eigenvalue by at most about ``ε · λ_max``. (A cross-entropy
    factor has ``C - 1`` columns per sample, see
    :func:`vivitlib.extensions.losses.cross_entropy_column_basis`: the softmax's
    null direction contributes no zero.)

    Measured on the digits MLP (N·C = 1280, after 0 / 200 / 3000 SGD steps):
    with a float32 factor and float64 eigensolver every kept eigenvalue agrees
    with the float64 computation to a relative ``1.6e-4`` or better, and ``K``
    is 1152 / 763 / 830 (the float64 run: 1152 / 1151 / 830; the classical
    ``M·ε`` rule in float32: 765 / 224 / 67). A float32 eigensolver keeps
    1117 / 437 / 119, each within ``2.1e-4``.

    Args:
        evals: Computed eigenvalues of the Gram matrix (any order), all of them.
        factor_dtype: Dtype the factor ``V`` was computed in.
        eigh_dtype: Dtype of the eigen-decomposition.

    Returns:
        ``τ``: eigenvalues ``> τ`` are kept.
    """
    if evals.numel() == 0:
        return 0.0
    lam_max = max(float(evals.max()), 0.0)
    lam_min = float(evals.min())
    eigh_error = EIGH_ERROR_CONSTANT * math.sqrt(evals.numel())
    tol = max(
        NOISE_FLOOR_SAFETY * max(-lam_min, 0.0),
        eigh_error * torch.finfo(eigh_dtype).eps * lam_max,
    )
    if lam_min >= 0:
        tol = max(tol, torch.finfo(factor_dtype).eps * lam_max)
    return tol


#: ``auto`` uses float32 only where its error is at most this share of the cut-off.
AUTO_FLOAT32_SHARE = 0.01


def choose_eigh_dtype(
    requested: torch.dtype | str, size: int, rtol: float | None
) -> torch.dtype:
    """The eigensolver's dtype: as requested, or the cheapest accurate one.

    For ``"auto"``: float32 is about twice as fast for large Gram
    matrices, but its backward error ``2√M·ε₃₂·λ_max`` (see
    :func:`eigenvalue_cutoff`) is far above the round-off of a float64 Gram
    matrix. ``"auto"`` therefore picks float32 only when the user asked for
    eigenvalues above ``rtol·λ_max`` with ``rtol ≥ 2√M·ε₃₂ / 0.01`` (every kept
    eigenvalue then carries at most 1 % error from the solver), and float64
    otherwise -- in particular for the default cut-off, which resolves what
    the factor's precision allows.

    Args:
        requested: ``torch.float32``, ``torch.float64`` or ``"auto"``.
        size: Gram size ``M``.
        rtol: The user's relative cut-off (``None``: the automatic one).

    Returns:
        ``torch.float32`` or ``torch.float64``.

    Raises:
        ValueError: On any other ``requested``.
    """
    if requested in (torch.float32, torch.float64):
        return requested
    if requested != "auto":
        raise ValueError(
            f"eigh_dtype must be torch.float32, torch.float64 or 'auto', got "
            f"{requested!r}."
        )
    bound = EIGH_ERROR_CONSTANT * math.sqrt(size) * torch.finfo(torch.float32).eps
    if rtol is not None and bound <= AUTO_FLOAT32_SHARE * rtol:
        return torch.float32
    return torch.float64


def check_rtol(rtol: float | None) -> float | None:
    """Validate a user-given relative cut-off: ``None`` or a number in ``[0, 1)``.

    Raises:
        TypeError: If ``rtol`` is not a real number.
        ValueError: If ``rtol`` is NaN, negative or ``>= 1``.
    """
    if rtol is None:
        return None
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(f"rtol must be a float or None, got {rtol!r}.")
    if math.isnan(rtol) or not 0 <= rtol < 1:
        raise ValueError(
            f"rtol must be in [0, 1) (eigenvalues <= rtol·λ_max are dropped), got "
            f"{rtol!r}; pass None for the automatic round-off cut-off."
        )
    return float(rtol)


def gram_eigh(
    gram: Tensor,
    rtol: float | None = None,
    dtype: torch.dtype | str = torch.float64,
    factor_dtype: torch.dtype | None = None,
    eigenvectors: bool = True,
    *,
    overwrite: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Nontrivial eigenpairs of a (positive semi-definite) Gram matrix.

    ``gram`` must be symmetric: one triangle is read. On CPU the
    decomposition runs in place (LAPACK ``?syevd``, the routine
    ``torch.linalg.eigh`` calls, with the same arguments: the same numbers) on
    ``gram`` itself when ``overwrite`` allows it and the dtypes agree, else on
    one copy; elsewhere ``torch.linalg.eigh`` / ``eigvalsh`` (which copy once).

    Args:
        gram: Gram matrix ``Vᵀ V``, shape ``[M, M]``.
        rtol: Eigenvalues ``≤ rtol · λ_max`` are dropped (a number in
            ``[0, 1)``). Default ``None``: the round-off cut-off
            :func:`eigenvalue_cutoff` of this computation's precision.
        dtype: Precision of the decomposition (default float64), or ``"auto"``
            (see :func:`choose_eigh_dtype`).
        factor_dtype: Dtype the factor was computed in (enters the default
            cut-off); defaults to ``gram.dtype``.
        eigenvectors: If ``False``, skip the eigenvectors (``eigvalsh``, about
            twice as fast) and return ``None`` in their place.
        overwrite: Allow ``gram``'s memory to be used as the solver's
            workspace (saves an ``[M, M]`` copy). With ``eigenvectors=False``
            only the upper triangle including the diagonal may change (the
            strict lower triangle is kept: ``mirror_upper_(gram.T)`` (see
            :func:`~vivitlib.linalg.gram.mirror_upper_`) and the saved
            diagonal rebuild the matrix); with ``eigenvectors=True`` all of
            ``gram`` may change and the returned eigenvectors may share its
            memory. Default ``False``: ``gram`` is left unchanged.

    Returns:
        ``(evals, evecs)``: eigenvalues ``[K]`` in descending order and
        orthonormal Gram eigenvectors ``[M, K]`` (or ``None``), in ``dtype``.

    Raises:
        ValueError: If the Gram matrix has NaN/Inf entries or is not square, or
            ``rtol`` is out of range.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square [M, M], got {tuple(gram.shape)}.")
    # a finite sum means finite entries (no M × M mask); if it overflows, look
    if not bool(torch.isfinite(gram.sum())):
        check_finite(
            gram,
            "The Gram matrix",
            "Check the inputs, labels and parameters for NaN/Inf or overflow.",
        )
    rtol = check_rtol(rtol)
    dtype = choose_eigh_dtype(dtype, gram.shape[0], rtol)
    factor_dtype = gram.dtype if factor_dtype is None else factor_dtype
    evals, rows = _eigh_ascending(gram, dtype, eigenvectors, overwrite)
    if evals.numel() == 0:
        return evals, None if rows is None else rows.T
    values = evals.detach()  # the cut-off is a number, not part of a graph
    if rtol is None:
        tol = eigenvalue_cutoff(values, factor_dtype=factor_dtype, eigh_dtype=dtype)
    else:
        tol = rtol * max(float(values[-1]), 0.0)
    # ascending order: the kept eigenpairs are a suffix; reversed in place
    first = evals.numel() - int((evals > tol).sum())
    evals = evals[first:].flip(0)
    return evals, None if rows is None else _descending_columns(rows, first)


def _descending_columns(rows: Tensor, first: int) -> Tensor:
    """Eigenvectors ``rows[first:]`` as columns ``[M, K]``, last one first.

    Most kept: reversed in place, a transposed view of ``rows`` (no second
    ``[M, M]`` buffer). Few kept (``K ≤ M/2``): gathered into a fresh
    row-major ``[M, K]``, so that ``rows`` can be freed.
    """
    M = rows.shape[0]
    tracked = rows.requires_grad and torch.is_grad_enabled()
    if 2 * (M - first) > M and not tracked:  # autograd saved a tracked one
        return _reverse_rows_(rows[first:]).T
    order = torch.arange(M - 1, first - 1, -1, device=rows.device)
    return rows.T.index_select(1, order)


def _eigh_ascending(
    gram: Tensor, dtype: torch.dtype, eigenvectors: bool, overwrite: bool
) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues ``[M]`` ascending and eigenvectors as rows ``[M, M]`` (or ``None``).

    Reads one triangle of ``gram``. The rows are a row-major tensor whose row
    ``j`` is the eigenvector of eigenvalue ``j``.
    """
    M = gram.shape[0]
    if syevd_applies(gram, dtype):
        in_place = overwrite and gram.dtype == dtype and gram.is_contiguous()
        if in_place:
            work = gram
        else:
            work = gram.to(dtype, copy=True, memory_format=torch.contiguous_format)
        evals = syevd_(work, eigenvectors)
        return evals, work if eigenvectors else None
    sym = gram.to(dtype)
    if not eigenvectors:
        return torch.linalg.eigvalsh(sym, UPLO="L"), None
    evals, evecs = torch.linalg.eigh(sym, UPLO="L")
    return evals, evecs.mT.view(M, M)


#: Entries moved at a time when reordering eigenvectors in place.
_REORDER_CHUNK_ELEMENTS = 2**18


def _reverse_rows_(rows: Tensor) -> Tensor:
    """Reverse the order of ``rows``' rows in place, a few rows at a time."""
    K = rows.shape[0]
    step = max(1, _REORDER_CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for i0 in range(0, K // 2, step):
        i1 = min(i0 + step, K // 2)
        top, bottom = rows[i0:i1], rows[K - i1 : K - i0]
        saved = top.flip(0)
        top.copy_(bottom.flip(0))
        bottom.copy_(saved)
    return rows


def lift(V: Tensor, gram_evecs: Tensor, evals: Tensor) -> Tensor:
    """Lift Gram eigenvectors to GGN eigenvectors ``e_k = V ẽ_k / √λ_k``.

    Args:
        V: Factor, shape ``[D, M]``.
        gram_evecs: Gram eigenvectors ``ẽ_k``, shape ``[M, K]``.
        evals: Matching nonzero eigenvalues, shape ``[K]``.

    Returns:
        Orthonormal GGN eigenvectors, shape ``[D, K]``, in ``V``'s dtype.
    """
    coeffs = gram_evecs / evals.sqrt()
    return V @ coeffs.to(V.dtype)
