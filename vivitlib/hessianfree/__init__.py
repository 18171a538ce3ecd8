r"""Matrix-free curvature over a whole data set: operators, Lanczos, spectra.

Operators (:class:`HessianOperator`, :class:`GGNOperator`,
:class:`EmpiricalFisherOperator`) multiply with the full-data curvature,
summing batches in float64 (and across ``torch.distributed`` ranks). The
algorithms accept them, dense torch matrices or scipy ``LinearOperator``\ s.
"""

from vivitlib.hessianfree._base import CurvatureOperator
from vivitlib.hessianfree.density import SpectralDensity, smooth, spectral_density
from vivitlib.hessianfree.lanczos import LanczosResult, lanczos
from vivitlib.hessianfree.operators import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)
from vivitlib.hessianfree.top_eigenpairs import EighResult, power_iteration, topk_eigh
from vivitlib.hessianfree.trace import (
    SketchResult,
    TraceEstimate,
    hutchinson_trace,
    sketch,
)

__all__ = [
    "CurvatureOperator",
    "EighResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LanczosResult",
    "SketchResult",
    "SpectralDensity",
    "TraceEstimate",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "sketch",
    "smooth",
    "spectral_density",
    "topk_eigh",
]
