"""The benchmarked optimisers: how each is built and which grid tunes it.

Every optimiser has one tuned hyperparameter (``lr``, or the damping ``δ`` for
constant-damping Newton) searched on a grid, or none (the untuned defaults).
Newton variants run their backward pass inside BackPACK; AdaHessian and SophiaH
(from ``pytorch-optimizer``) need ``backward(create_graph=True)`` for their
Hutchinson diagonal; Shampoo is a plain first-order call (its matrix roots are
recomputed every 10 steps, else it costs seconds per step on the CNN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vivitlib.optim import BootstrapDamping, ConstantDamping, DampedNewton

#: Optimisers that need ``pytorch-optimizer`` (skipped when it is missing).
PEERS = ("adahessian", "sophiah", "shampoo")


@dataclass(frozen=True)
class Spec:
    """How to build and call one optimiser.

    Attributes:
        name: Registry name.
        hparam: Name of the tuned hyperparameter (``""``: untuned).
        grid: Values tried when tuning (one value when untuned).
        kind: ``"first"`` (plain backward), ``"hessian"`` (``create_graph``) or
            ``"newton"`` (backward inside BackPACK).
        closure: Call ``step(closure)`` (Newton: loss re-evaluated at the new point).
        make: ``(params, value, seed) -> optimizer``.
    """

    name: str
    hparam: str
    grid: tuple[float, ...]
    kind: str
    closure: bool
    make: Callable[[list[nn.Parameter], float, int], torch.optim.Optimizer]


def _decades(low: float, high: float, per_decade: int) -> tuple[float, ...]:
    num = round(per_decade * np.log10(high / low)) + 1
    return tuple(
        float(f"{v:.3g}") for v in np.logspace(np.log10(low), np.log10(high), num)
    )


def _pytorch_optimizer(name: str):
    import pytorch_optimizer  # noqa: PLC0415 - optional dependency

    return getattr(pytorch_optimizer, name)


def _newton(**kwargs):
    def make(params, value, seed):
        options = dict(kwargs)
        damping = options.pop("damping", None)
        if damping == "constant":
            damping = ConstantDamping(value)
        elif damping is None:
            damping = BootstrapDamping(generator=seed)
        else:
            damping = damping(seed)
        if options.pop("tune_complement", False):
            options["complement_lr"] = value
        return DampedNewton(params, damping, **options)

    return make


def _p25(seed: int) -> BootstrapDamping:
    return BootstrapDamping(generator=seed, percentile=25.0)


def _independent(seed: int) -> BootstrapDamping:
    return BootstrapDamping(generator=seed, independent=True)


def specs(fine: bool = True) -> dict[str, Spec]:
    """All optimisers; ``fine=False`` gives the quick mode's coarser grids.

    Args:
        fine: Full grids (constant damping 4 per decade, learning rates 2 per
            decade) or coarse ones (2 resp. 1 per decade). Default: ``True``.

    Returns:
        The specs by name, in reporting order.
    """
    lr_per = 2 if fine else 1
    damp_per = 4 if fine else 2
    table = [
        Spec("sgd", "lr", _decades(1e-2, 1.0, lr_per), "first", False,
             lambda p, v, s: torch.optim.SGD(p, lr=v, momentum=0.9)),
        Spec("adam", "lr", _decades(1e-4, 1e-1, lr_per), "first", False,
             lambda p, v, s: torch.optim.Adam(p, lr=v)),
        Spec("adahessian", "lr", _decades(1e-2, 1.0, lr_per), "hessian", False,
             lambda p, v, s: _pytorch_optimizer("AdaHessian")(p, lr=v)),
        Spec("sophiah", "lr", _decades(1e-3, 1e-1, lr_per), "hessian", False,
             lambda p, v, s: _pytorch_optimizer("SophiaH")(p, lr=v)),
        Spec("shampoo", "lr", _decades(1e-3, 1e-1, lr_per), "first", False,
             lambda p, v, s: _pytorch_optimizer("Shampoo")(
                 p, lr=v, preconditioning_compute_steps=10)),
        Spec("newton_constant", "damping", _decades(1e-3, 10.0, damp_per), "newton",
             False, _newton(damping="constant", safeguards=False)),
        Spec("newton_default", "", (0.0,), "newton", True, _newton()),
        Spec("newton_default_noclosure", "", (0.0,), "newton", False, _newton()),
        Spec("newton_bootstrap_unsafe", "", (0.0,), "newton", False,
             _newton(safeguards=False)),
        Spec("newton_p25", "", (0.0,), "newton", True, _newton(damping=_p25)),
        Spec("newton_independent", "", (0.0,), "newton", True,
             _newton(damping=_independent)),
        Spec("newton_no_complement", "", (0.0,), "newton", True,
             _newton(complement_lr=0.0)),
        Spec("newton_no_momentum", "", (0.0,), "newton", True,
             _newton(complement_momentum=0.0)),
        Spec("newton_scaled_trust", "", (0.0,), "newton", True,
             _newton(trust_solve="scale", complement_momentum=0.0)),
        Spec("newton_complement", "complement_lr", _decades(1e-2, 1.0, lr_per),
             "newton", True, _newton(tune_complement=True)),
        # ablations of the session-4 defaults (exact curvature on the first 32
        # samples with a closure, relative damping floor 0.1)
        Spec("newton_mc1_floor", "", (0.0,), "newton", True,
             _newton(curvature_samples=None)),
        Spec("newton_sub32_lowfloor", "", (0.0,), "newton", True,
             _newton(initial_damping=1e-3, damping_floor=1e-4)),
        Spec("newton_session3", "", (0.0,), "newton", True,
             _newton(curvature_samples=None, initial_damping=1e-3,
                     damping_floor=1e-4)),
    ]  # fmt: skip
    return {spec.name: spec for spec in table}


def peers_available() -> bool:
    """Whether ``pytorch-optimizer`` can be imported."""
    try:
        import pytorch_optimizer  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True
