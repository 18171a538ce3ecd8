"""The GGN factor ``V`` of one parameter, as tensors (no BackPACK import).

Every consumer of a layer's share of ``V`` works through this package:

* :mod:`~vivitlib.factors.representations` -- the representations (dense
  ``[C, N, D_p]``; outer products ``Σ_t s_cnt a_ntᵀ`` of linear and convolution
  weights; the same for per-sample gradients), their contraction into Gram
  blocks and ``Vᵀg`` (:func:`contract`), lifting (:func:`factor_apply`) and the
  one cost model choosing the contraction plan (:func:`outer_costs`);
* :mod:`~vivitlib.factors.kernels` -- the contraction kernels (pairwise
  weight-sharing Gram at GEMM speed, blocked symmetric products);
* :mod:`~vivitlib.factors.projections` -- projections onto given directions.

``vivitlib.extensions`` holds only the BackPACK glue that produces these
pieces during a backward pass.
"""

from vivitlib.factors.projections import project_factor, project_grads
from vivitlib.factors.representations import (
    DenseFactor,
    DenseGrads,
    Factor,
    Grads,
    OuterFactor,
    OuterGrads,
    contract,
    factor_apply,
    outer_costs,
    outer_plan,
)

__all__ = [
    "DenseFactor",
    "DenseGrads",
    "Factor",
    "Grads",
    "OuterFactor",
    "OuterGrads",
    "contract",
    "factor_apply",
    "outer_costs",
    "outer_plan",
    "project_factor",
    "project_grads",
]
