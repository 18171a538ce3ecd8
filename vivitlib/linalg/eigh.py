"""Eigen-decomposition of the Gram matrix, its round-off cut-off, and lifting."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vivitlib._checks import check_finite

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
    observed noise floor (available whenever the Gram matrix is rank-deficient,
    e.g. always for cross-entropy, which has one zero per sample); the second
    is the eigensolver's backward error (Weyl: ``|λ̂ - λ| ≤ ‖E‖``, and
    Householder tridiagonalisation has ``‖E‖ ≲ √M ε ‖G‖`` in practice); the
    third is an a-priori bound used only when no negative eigenvalue shows the
    noise (full-rank Gram): a factor with relative error ``ε`` per entry moves
    every eigenvalue by at most about ``ε · λ_max``.

    Measured on the digits MLP (N·C = 1280, after 0 / 200 / 3000 SGD steps):
    with a float32 factor and float64 eigensolver every kept eigenvalue agrees
    with the float64 computation to a relative ``1.2e-4`` or better, and ``K``
    is 1152 / 881 / 346 (the float64 run: 1152 / 1151 / 829; the classical
    ``M·ε`` rule in float32: 765 / 224 / 67). A float32 eigensolver keeps
    1114 / 432 / 119, each within ``2.2e-4``.

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
) -> tuple[Tensor, Tensor | None]:
    """Nontrivial eigenpairs of a (positive semi-definite) Gram matrix.

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

    Returns:
        ``(evals, evecs)``: eigenvalues ``[K]`` in descending order and
        orthonormal Gram eigenvectors ``[M, K]`` (or ``None``), in ``dtype``.

    Raises:
        ValueError: If the Gram matrix has NaN/Inf entries or is not square, or
            ``rtol`` is out of range.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square [M, M], got {tuple(gram.shape)}.")
    check_finite(
        gram,
        "The Gram matrix",
        "Check the inputs, labels and parameters for NaN/Inf or overflow.",
    )
    rtol = check_rtol(rtol)
    dtype = choose_eigh_dtype(dtype, gram.shape[0], rtol)
    factor_dtype = gram.dtype if factor_dtype is None else factor_dtype
    # eigh reads one triangle only: no symmetrised copy of the M × M matrix
    sym = gram.to(dtype)
    if eigenvectors:
        evals, evecs = torch.linalg.eigh(sym, UPLO="L")
    else:
        evals, evecs = torch.linalg.eigvalsh(sym, UPLO="L"), None
    if evals.numel() == 0:
        return evals, evecs
    if rtol is None:
        tol = eigenvalue_cutoff(evals, factor_dtype=factor_dtype, eigh_dtype=dtype)
    else:
        tol = rtol * max(float(evals[-1]), 0.0)
    # ascending order: the kept eigenvalues are a suffix; reverse it with one
    # gather into a fresh row-major [M, K] (eigh's vectors are column-major)
    first = evals.numel() - int((evals > tol).sum())
    evals = evals[first:].flip(0)
    if evecs is not None:
        order = torch.arange(evecs.shape[1] - 1, first - 1, -1, device=evecs.device)
        evecs = evecs.index_select(1, order)
    return evals, evecs


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
