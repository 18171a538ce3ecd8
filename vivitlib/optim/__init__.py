"""Damped Newton optimizer along GGN eigen-directions and damping strategies."""

from vivitlib.optim.damped_newton import DampedNewton, DampingRecord
from vivitlib.optim.damping import BootstrapDamping, ConstantDamping, DampingStrategy
from vivitlib.optim.lanczos_newton import LanczosDampedNewton, RefreshRecord
from vivitlib.optim.safeguards import StepControl, StepPlan

__all__ = [
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
