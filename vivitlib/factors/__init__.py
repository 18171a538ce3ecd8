"""The GGN factor ``V`` of one parameter, as tensors (no BackPACK import).

Every consumer of a layer's share of ``V`` works through the :class:`Factor`
and :class:`Grads` interfaces (:mod:`.base`); each representation is one
class:

* :class:`DenseFactor` / :class:`DenseGrads` (:mod:`.dense`) -- ``[C, N, D_p]``,
  BackPACK's layout, for every layer without a factored form;
* :class:`KroneckerFactor` (:mod:`.kronecker`) -- plain linear weights,
  ``v_cn = s_cn a_nᵀ``;
* :class:`UnfoldedFactor` (:mod:`.unfolded`) -- weights shared over positions
  (convolutions, sequences), ``v_cn = Σ_t s_cnt a_ntᵀ``;
* :class:`OuterGrads` (:mod:`.outer`) -- per-sample gradients of both.

:mod:`.costs` is the one cost model choosing plans and representations,
:mod:`.kernels` (the ``'dense'`` plan, symmetric Gram products) and
:mod:`.pairwise` (the ``'pairwise'`` plan) the contraction kernels. All of
them use one column order, class-major ``(c, n)``. ``vivitlib.extensions``
holds only the BackPACK glue that produces these pieces during a backward
pass.

Adding a layer type's fast path is a new representation here (a
:class:`Factor` subclass) or one table entry in
:mod:`vivitlib.extensions.layers`.
"""

from torch import Tensor

from vivitlib.factors.base import Factor, Grads, SampleMap
from vivitlib.factors.costs import CostModel, cost_model, current_cost_model
from vivitlib.factors.dense import DenseFactor, DenseGrads
from vivitlib.factors.kronecker import KroneckerFactor
from vivitlib.factors.outer import OuterFactor, OuterGrads
from vivitlib.factors.unfolded import UnfoldedFactor


def outer_factor(s: Tensor, a: Tensor, source: object = None) -> OuterFactor:
    """The outer-product representation for ``s`` ``[C, N, T, O]``, ``a`` ``[N, T, I]``.

    :class:`KroneckerFactor` for ``T = 1``, :class:`UnfoldedFactor` otherwise.
    """
    cls = KroneckerFactor if s.shape[2] == 1 else UnfoldedFactor
    return cls(s, a, source)


def as_factor(factor: Factor | Tensor) -> Factor:
    """A factor; BackPACK's dense ``[C, N, *param.shape]`` tensor is wrapped."""
    return DenseFactor.of(factor) if isinstance(factor, Tensor) else factor


def as_grads(grads: Grads | Tensor | None) -> Grads | None:
    """Per-sample gradients; BackPACK's ``[N', *param.shape]`` tensor is wrapped."""
    return DenseGrads.of(grads) if isinstance(grads, Tensor) else grads


__all__ = [
    "CostModel",
    "DenseFactor",
    "DenseGrads",
    "Factor",
    "Grads",
    "KroneckerFactor",
    "OuterFactor",
    "OuterGrads",
    "SampleMap",
    "UnfoldedFactor",
    "as_factor",
    "as_grads",
    "cost_model",
    "current_cost_model",
    "outer_factor",
]
