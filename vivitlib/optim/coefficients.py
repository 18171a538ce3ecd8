r"""The damped Newton coefficient ``-γ_k / (λ_k + δ_k)``: the one place it is computed.

Every Newton step of :mod:`vivitlib.optim` moves along orthonormal directions
``e_k`` by ``c_k = -γ_k / (λ_k + δ_k)``: the safeguarded step
(:class:`~vivitlib.optim.safeguards.StepControl`), the bootstrap's candidate steps
(:class:`~vivitlib.optim.BootstrapDamping`) and
:meth:`~vivitlib.optim.LanczosDampedNewton.step_coefficients` all call
:func:`newton_coefficients`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["newton_coefficients"]


def newton_coefficients(gammas: Tensor, curvatures: Tensor, dampings: Tensor) -> Tensor:
    r"""Step sizes ``c_k = -γ_k / (λ_k + δ_k)`` along each direction.

    The arguments broadcast against each other (e.g. ``dampings [C, 1]`` against
    ``gammas [K]`` gives a ``[C, K]`` table). A direction takes no step
    (``c_k = 0``) where ``δ_k = inf`` or ``λ_k + δ_k <= 0``: nothing is divided by
    a vanishing or negative denominator.

    Args:
        gammas: Directional gradients ``γ_k``.
        curvatures: Curvatures ``λ_k``.
        dampings: Dampings ``δ_k >= 0`` (``inf``: no step).

    Returns:
        The coefficients, in the broadcast shape of the arguments.

    Example:
        >>> import torch
        >>> newton_coefficients(
        ...     torch.tensor([2.0, 1.0, 1.0]),
        ...     torch.tensor([1.0, 1.0, 0.0]),
        ...     torch.tensor([1.0, float("inf"), 0.0]),
        ... )
        tensor([-1.,  0.,  0.])
    """
    denominator = curvatures + dampings
    skip = torch.isinf(dampings) | (denominator <= 0)
    return torch.where(skip, 0.0, -gammas / torch.where(skip, 1.0, denominator))
