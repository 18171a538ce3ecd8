"""Damped Newton steps along GGN eigen-directions, assembled in Gram space.

:func:`newton_step_sizes` is the one place the damped Newton coefficient
``-γ_k / (λ_k + δ_k)`` is computed; the blocks' steps and the optimisers use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vivitlib._checks import check_damping


def newton_step_sizes(gammas: Tensor, curvatures: Tensor, dampings: Tensor) -> Tensor:
    r"""Step sizes ``c_k = -γ_k / (λ_k + δ_k)`` along orthonormal directions.

    The arguments broadcast against each other (e.g. ``dampings [C, 1]`` against
    ``gammas [K]`` gives a ``[C, K]`` table). A direction takes no step
    (``c_k = 0``) where ``δ_k = inf`` or ``λ_k + δ_k <= 0``: nothing is divided
    by a vanishing or negative denominator.

    Args:
        gammas: Directional gradients ``γ_k``.
        curvatures: Curvatures ``λ_k``.
        dampings: Dampings ``δ_k >= 0`` (``inf``: no step).

    Returns:
        The step sizes, in the broadcast shape of the arguments.

    Example:
        >>> import torch
        >>> newton_step_sizes(
        ...     torch.tensor([2.0, 1.0, 1.0]),
        ...     torch.tensor([1.0, 1.0, 0.0]),
        ...     torch.tensor([1.0, float("inf"), 0.0]),
        ... )
        tensor([-1.,  0.,  0.])
    """
    denominator = curvatures + dampings
    skip = torch.isinf(dampings) | (denominator <= 0)
    return torch.where(skip, 0.0, -gammas / torch.where(skip, 1.0, denominator))


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
    step_sizes = newton_step_sizes(gamma_means.to(evals.dtype), evals, delta)
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
