"""The optimisers the network studies compare, built by name.

* ``sgd`` (with momentum) and ``adam``: torch's.
* ``newton_constant``: :class:`vivitlib.optim.DampedNewton` with a constant damping.
* ``newton_bootstrap``: bootstrap damping over :func:`bootstrap_grid` from
  ``bootstrap_min`` (the library's default grid ``1e-4..1e2``).
* ``newton_bootstrap_floor``: bootstrap damping over candidates ``>= damping`` only.
* ``newton_default``: the untuned ``DampedNewton(params)`` with its safeguards.

The three tuned Newton variants run with ``safeguards=False`` (the plain method).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

#: First-order optimisers (the checkpointed runs of the curvature studies).
FIRST_ORDER = ("sgd", "adam")
#: Damped Newton variants (see the module doc).
NEWTON = (
    "newton_constant",
    "newton_bootstrap",
    "newton_bootstrap_floor",
    "newton_default",
)
#: Every name :func:`make_optimizer` builds.
OPTIMIZERS = FIRST_ORDER + NEWTON


def bootstrap_grid(low: float, high: float = 100.0, per_decade: int = 10) -> Tensor:
    """Log-spaced bootstrap damping candidates from ``low`` to ``high``, both included.

    Args:
        low: Smallest candidate (> 0).
        high: Largest candidate. Default: ``100``.
        per_decade: Candidates per decade. Default: ``10``.

    Returns:
        The candidates ``[M]``, ascending.

    """
    decades = math.log10(high / low)
    num = max(round(per_decade * decades), 1) + 1
    return torch.logspace(math.log10(low), math.log10(high), num)


def make_optimizer(
    name: str,
    params: Iterable[Tensor],
    *,
    lr: float,
    momentum: float = 0.9,
    seed: int = 0,
    damping: float = 3.0,
    bootstrap_min: float = 1e-4,
    mc_samples: int = 1,
) -> torch.optim.Optimizer:
    """Create the optimiser ``name`` (one of :data:`OPTIMIZERS`).

    Args:
        name: The optimiser (see the module doc).
        params: Parameters to optimise (of a BackPACK-extended model for Newton).
        lr: Learning rate (unused by ``newton_default``).
        momentum: SGD momentum. Default: ``0.9``.
        seed: Seed of the bootstrap's generator. Default: ``0``.
        damping: Constant damping of ``newton_constant``, smallest candidate of
            ``newton_bootstrap_floor``. Default: ``3.0``.
        bootstrap_min: Smallest candidate of ``newton_bootstrap``. Default:
            ``1e-4``.
        mc_samples: MC samples of the GGN for Newton. Default: ``1``.

    Returns:
        The optimiser.

    Raises:
        ValueError: If ``name`` is not one of :data:`OPTIMIZERS`.

    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    from vivitlib.optim import BootstrapDamping, ConstantDamping, DampedNewton

    if name == "newton_default":
        return DampedNewton(params, mc_samples=mc_samples, track_dampings=True)
    if name == "newton_constant":
        strategy = ConstantDamping(damping)
    else:
        low = damping if name == "newton_bootstrap_floor" else bootstrap_min
        strategy = BootstrapDamping(candidates=bootstrap_grid(low), generator=seed)
    return DampedNewton(
        params, strategy, lr=lr, mc_samples=mc_samples, track_dampings=True,
        safeguards=False,
    )  # fmt: skip
