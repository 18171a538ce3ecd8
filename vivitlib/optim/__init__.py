"""Damped Newton optimizer along GGN eigen-directions and damping strategies."""

from vivitlib.optim.damped_newton import DampedNewton, DampingRecord
from vivitlib.optim.damping import BootstrapDamping, ConstantDamping, DampingStrategy

__all__ = [
    "BootstrapDamping",
    "ConstantDamping",
    "DampedNewton",
    "DampingRecord",
    "DampingStrategy",
]
