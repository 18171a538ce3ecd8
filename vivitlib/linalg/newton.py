"""Damped Newton steps along GGN eigen-directions, assembled in Gram space."""

from __future__ import annotations

from torch import Tensor

from vivitlib._checks import check_damping


def newton_coefficients(
    gram_evecs: Tensor, evals: Tensor, gamma_means: Tensor, damping: float | Tensor
) -> Tensor:
    r"""Gram-space coefficients ``c`` with ``Δθ = V c``.

    .. math::
        Δθ = -\sum_k \frac{γ_k}{λ_k + δ_k} e_k
           = V \sum_k \frac{-γ_k}{(λ_k + δ_k)\sqrt{λ_k}} \tilde{e}_k

    Flat directions (``λ = 0``) are left alone; ``δ_k = inf`` skips direction k.

    Args:
        gram_evecs: Gram eigenvectors ``[M, K]``.
        evals: Nonzero eigenvalues ``[K]``.
        gamma_means: Directional gradients ``γ_k``, shape ``[K]``.
        damping: ``δ`` (scalar) or ``δ_k`` (shape ``[K]``), each ``>= 0``.

    Returns:
        Coefficients ``c``, shape ``[M]``.
    """
    delta = check_damping(damping, evals.numel()).to(evals.device, evals.dtype)
    step_sizes = -gamma_means.to(evals.dtype) / (evals + delta)
    return gram_evecs @ (step_sizes / evals.sqrt())


def newton_step(
    V: Tensor,
    gram_evecs: Tensor,
    evals: Tensor,
    gamma_means: Tensor,
    damping: float | Tensor,
) -> Tensor:
    """Damped Newton step ``-Σ_k γ_k / (λ_k + δ_k) e_k`` in parameter space.

    Args:
        V: Factor ``[D, M]``.
        gram_evecs: Gram eigenvectors ``[M, K]``.
        evals: Nonzero eigenvalues ``[K]``.
        gamma_means: ``γ_k``, shape ``[K]``.
        damping: Scalar or ``[K]`` damping.

    Returns:
        The step, shape ``[D]``.
    """
    coeffs = newton_coefficients(gram_evecs, evals, gamma_means, damping)
    return V @ coeffs.to(V.dtype)
