"""Old import path of the noisy quadratic, kept for the optimizer benchmark.

The problem lives in :mod:`experiments.problems.noisy_quadratic`; import it from there.
"""

from experiments.problems.noisy_quadratic import (
    NOISE_MODELS,
    NoisyQuadratic,
    make_damping,
    optimizer_names,
    run,
)

__all__ = ["NOISE_MODELS", "NoisyQuadratic", "make_damping", "optimizer_names", "run"]
