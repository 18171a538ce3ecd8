"""Damped inverse-GGN-vector products ``(G + δI)⁻¹ v`` from the Gram matrix."""

from __future__ import annotations

import math

from torch import Tensor


def inverse_weights(evals: Tensor, damping: float) -> Tensor:
    r"""Per-direction weights ``w_k`` of the eigenspace correction.

    .. math::
        (G + δI)^{-1} v = \frac{v}{δ} + \sum_k w_k\, e_k e_k^⊤ v, \qquad
        w_k = \frac{1}{λ_k + δ} - \frac{1}{δ}

    For ``δ = 0`` the pseudo-inverse: ``w_k = 1/λ_k`` and no ``v/δ`` term.

    Args:
        evals: Nonzero eigenvalues ``[K]``.
        damping: ``δ >= 0``, finite.

    Returns:
        ``w`` ``[K]``, in ``evals``' dtype.

    Raises:
        ValueError: If ``damping`` is negative, NaN or infinite.
    """
    check_solve_damping(damping)
    if damping == 0:
        return 1 / evals
    return 1 / (evals + damping) - 1 / damping


def check_solve_damping(damping: float) -> float:
    """Validate the damping of an inverse product: a finite number ``>= 0``.

    Raises:
        TypeError: If ``damping`` is not a real number.
        ValueError: If it is negative, NaN or infinite.
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"damping must be a float >= 0, got {damping!r}.")
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(
            f"damping must be finite and >= 0 (0 = pseudo-inverse), got {damping!r}."
        )
    return float(damping)


def inverse_ggn_product(
    V: Tensor, gram_evecs: Tensor, evals: Tensor, v: Tensor, damping: float
) -> Tensor:
    r"""``(G + δI)⁻¹ v`` for ``G = V Vᵀ``, through the Gram eigenpairs.

    Costs one application of ``Vᵀ`` and one of ``V``; no ``D × D`` matrix.

    .. math::
        (G + δI)^{-1} v = \frac{v}{δ}
            + V \tilde{E}\, \mathrm{diag}\!\Bigl(\frac{w_k}{λ_k}\Bigr)
              \tilde{E}^⊤ V^⊤ v

    with ``w`` from :func:`inverse_weights` (``δ = 0``: pseudo-inverse).

    Args:
        V: Factor ``[D, M]``.
        gram_evecs: Gram eigenvectors ``ẽ_k`` ``[M, K]``.
        evals: Matching nonzero eigenvalues ``[K]``.
        v: Vector ``[D]`` or vectors ``[D, k]``.
        damping: ``δ >= 0``.

    Returns:
        Same shape as ``v``.

    Example:
        >>> import torch
        >>> V = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
        >>> evals, evecs = torch.tensor([4.0], dtype=torch.float64), torch.ones(1, 1)
        >>> inverse_ggn_product(V, evecs.double(), evals, torch.ones(2).double(), 1.0)
        tensor([0.2000, 1.0000], dtype=torch.float64)
    """
    weights = inverse_weights(evals, damping)
    coords = gram_evecs.T @ (V.T @ v).to(gram_evecs.dtype)  # √λ_k e_kᵀ v
    scale = weights / evals
    coords = coords * (scale if coords.ndim == 1 else scale[:, None])
    out = V @ (gram_evecs @ coords).to(V.dtype)
    return out if damping == 0 else out + v / damping
