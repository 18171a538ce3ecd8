"""Damped Newton optimizer along GGN eigen-directions and damping strategies."""

from vivitlib.optim.damped_newton import DampedNewton, DampingRecord
from vivitlib.optim.damping import (
    BootstrapDamping,
    ConstantDamping,
    DampingStrategy,
    as_strategy,
    check_dampings,
    strategy_state,
)
from vivitlib.optim.lanczos_newton import LanczosDampedNewton, RefreshRecord
from vivitlib.optim.safeguards import StepControl, StepPlan

__all__ = [
    "as_strategy",
    "check_dampings",
    "strategy_state",
    "BootstrapDamping",
    "ConstantDamping",
    "DampedNewton",
    "DampingRecord",
    "DampingStrategy",
    "LanczosDampedNewton",
    "RefreshRecord",
    "StepControl",
    "StepPlan",
]
