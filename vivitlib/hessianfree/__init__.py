"""Matrix-free curvature over a whole data set: operators, Lanczos, spectra."""

from vivitlib.hessianfree._base import CurvatureOperator
from vivitlib.hessianfree.operators import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
]
