"""vivitlib: exact, fast access to GGN curvature and its mini-batch noise."""

from vivitlib import errors, hessianfree, linalg, optim
from vivitlib.block import GGNBlock
from vivitlib.directional import DirectionalDerivatives, per_sample_hessian_curvatures
from vivitlib.ggn import QUANTITIES, LowRankGGN
from vivitlib.groups import layerwise_groups
from vivitlib.joint import combine

__version__ = "0.1.0"

__all__ = [
    "DirectionalDerivatives",
    "GGNBlock",
    "LowRankGGN",
    "QUANTITIES",
    "combine",
    "errors",
    "layerwise_groups",
    "hessianfree",
    "linalg",
    "optim",
    "per_sample_hessian_curvatures",
]
