"""Unfolded representation: a weight shared over ``T > 1`` positions.

Convolutions (``a`` is the unfolded input, one row per output pixel) and
linear layers applied along a sequence. The Gram block is computed by one of
two plans chosen by the cost model (:meth:`.CostModel.gram_plan_for`):
``'dense'`` forms ``V`` once and contracts it, ``'pairwise'`` contracts input
kernels per sample pair without ever forming ``V`` (see :mod:`.kernels` and
:mod:`.pairwise`).
"""

from __future__ import annotations

from torch import Tensor

from vivitlib.factors import kernels, pairwise
from vivitlib.factors.base import Factor, Grads
from vivitlib.factors.costs import current_cost_model
from vivitlib.factors.outer import OuterFactor, grads_slices


class UnfoldedFactor(OuterFactor):
    """``V`` of a weight-shared layer, ``s`` ``[C, N, T, O]``, ``a`` ``[N, T, I]``."""

    def contract(self, grads: Grads | None, keep: bool = False):  # noqa: D102
        model = current_cost_model()
        if model.gram_plan_for(*self.dims) == "pairwise":
            shared = self._outer_grads(grads) if self.shares_input(grads) else None
            gram, vtg = pairwise.pairwise_gram(
                self.s,
                self.a,
                None if shared is None else shared.delta,
                chunk_elements=model.chunk_elements,
                workspace_elements=model.workspace_elements,
            )
            if vtg is None and grads is not None:
                vtg = self.times_grads(grads)
            return gram, vtg, self._kept() if keep else None
        if keep and model.keep_dense(*self.dims):
            dense = self.dense()  # formed once: for the Gram and for lifting
            gram, vtg, _ = dense.contract(grads)
            return gram, vtg, dense
        gram, vtg = kernels.dense_plan_gram(
            self.s,
            self.a,
            grads_slices(grads, self.s.shape[-1]),
            chunk_elements=model.slice_elements(self.s.shape[0] * self.s.shape[1]),
        )
        return gram, vtg, self if keep else None

    def times_grads(self, grads: Grads) -> Tensor:  # noqa: D102
        outer = self._outer_grads(grads)
        model = current_cost_model()
        if outer is None or model.gram_plan_for(*self.dims) != "pairwise":
            return self.dense().times_grads(grads)
        return pairwise.pairwise_times_grads(
            self.s, self.a, outer.delta, outer.a, chunk_elements=model.chunk_elements
        )

    def _kept(self) -> Factor:
        """Dense ``V`` when the cost model says so, else this factor."""
        return self.dense() if current_cost_model().keep_dense(*self.dims) else self
