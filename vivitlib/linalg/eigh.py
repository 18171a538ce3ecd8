"""Eigen-decomposition of the Gram matrix and lifting to parameter space."""

from __future__ import annotations

import torch
from torch import Tensor

from vivitlib._checks import check_finite


def default_rtol(num_columns: int, dtype: torch.dtype) -> float:
    """Relative threshold below which Gram eigenvalues count as zero.

    Eigenvalues ``λ ≤ rtol · λ_max`` are round-off of a rank-deficient Gram
    matrix (cross-entropy alone contributes one zero per sample). The default
    follows the usual numerical-rank rule ``rtol = M · ε(dtype)`` with ``M`` the
    Gram size and ``ε`` the machine epsilon of the dtype the factor was
    computed in (``1.2e-7`` for float32, ``2.2e-16`` for float64).

    Args:
        num_columns: Gram matrix size ``M``.
        dtype: Floating dtype the factor ``V`` was computed in.

    Returns:
        The relative threshold.
    """
    return max(num_columns, 1) * torch.finfo(dtype).eps


def gram_eigh(
    gram: Tensor,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
    factor_dtype: torch.dtype | None = None,
    eigenvectors: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Nontrivial eigenpairs of a (positive semi-definite) Gram matrix.

    Args:
        gram: Gram matrix ``Vᵀ V``, shape ``[M, M]``.
        rtol: Eigenvalues ``≤ rtol · λ_max`` are dropped. Default
            :func:`default_rtol` for ``factor_dtype``.
        dtype: Precision of the decomposition (default float64).
        factor_dtype: Dtype the factor was computed in (sets the default
            ``rtol``); defaults to ``gram.dtype``.
        eigenvectors: If ``False``, skip the eigenvectors (``eigvalsh``, about
            twice as fast) and return ``None`` in their place.

    Returns:
        ``(evals, evecs)``: eigenvalues ``[K]`` in descending order and
        orthonormal Gram eigenvectors ``[M, K]`` (or ``None``), in ``dtype``.

    Raises:
        ValueError: If the Gram matrix has NaN/Inf entries or is not square.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square [M, M], got {tuple(gram.shape)}.")
    check_finite(
        gram,
        "The Gram matrix",
        "Check the inputs, labels and parameters for NaN/Inf or overflow.",
    )
    factor_dtype = gram.dtype if factor_dtype is None else factor_dtype
    if rtol is None:
        rtol = default_rtol(gram.shape[0], factor_dtype)
    sym = gram.to(dtype)
    sym = 0.5 * (sym + sym.T)
    if eigenvectors:
        evals, evecs = torch.linalg.eigh(sym)
        evals, evecs = evals.flip(0), evecs.flip(1)
    else:
        evals, evecs = torch.linalg.eigvalsh(sym).flip(0), None
    if evals.numel() == 0:
        return evals, evecs
    keep = evals > rtol * evals[0].clamp(min=0)
    if evals[0] <= 0:
        keep = torch.zeros_like(keep)
    return evals[keep], None if evecs is None else evecs[:, keep]


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
