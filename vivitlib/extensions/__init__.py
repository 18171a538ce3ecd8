"""BackPACK side: extensions that collect the GGN factor and per-sample gradients."""

from vivitlib.extensions.backpack_ext import (
    FACTOR_FIELD,
    GRADS_FIELD,
    BatchGradsExtension,
    GGNFactorExtension,
)

__all__ = ["FACTOR_FIELD", "GRADS_FIELD", "BatchGradsExtension", "GGNFactorExtension"]
