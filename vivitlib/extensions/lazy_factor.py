"""A convolution weight's factor whose output factor ``s`` is lazy: never formed whole.

Two Gram plans (:meth:`vivitlib.factors.CostModel.gram_plan_for`) read ``s``
in pieces, so a lazy ``s`` (:class:`~vivitlib.extensions.lazy.LazyColumns`)
is formed a piece at a time from its lazy source:

* ``'dense'`` (:class:`ChannelSlicedFactor`): for a weight-shared layer with
  a large dense ``V`` (3C3D's second convolution: ``V`` 141 MiB, ``s`` 34 MiB
  at ``N = 64``) the plan forms ``V`` a slice of output channels at a time
  (:func:`vivitlib.factors.kernels.dense_plan_gram`). Where every pending map
  can form a subset of channels alone (activations, max pooling, flatten,
  convolutions with ``groups=1``), the same slices of ``s`` are formed from
  the lazy source, so neither ``s`` nor ``V`` exists whole: memory holds the
  lazy source, the unfolded input (or, under a small budget, one block of it:
  :class:`~vivitlib.factors.kernels.InputBlocks`) and one slice. (Maps every
  slice would rerun whole -- up to a previous convolution's ``Jᵀ`` -- are
  formed once before, :func:`~vivitlib.extensions.lazy_layers.sliceable`.)
* ``'pairwise'`` (:class:`SampleBlockedFactor`, under a ``max_memory``): late
  convolutions with few positions (3C3D's third: ``s`` 10 MiB at ``N = 64``,
  ``C = 9``) contract input kernels per pair of samples
  (:func:`vivitlib.factors.pairwise.pairwise_gram`), which lays ``s`` out a
  block of samples at a time under a budget; where every pending map acts on
  a block of samples alone, those blocks are formed from the lazy source
  (:class:`~vivitlib.factors.pairwise.FactorBlocks`).

Everything else a factor offers (keeping it for lifting, projections, the
exchange between ranks, ``Vᵀ g`` for gradients of other samples) forms ``s``
once and hands over to :class:`~vivitlib.factors.UnfoldedFactor`.
"""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor

from vivitlib.extensions.lazy import LazyColumns
from vivitlib.factors import Factor, Grads, current_cost_model, kernels, pairwise
from vivitlib.factors import outer_factor as _outer_factor
from vivitlib.factors.outer import OuterGrads, grads_slices
from vivitlib.memory import current_budget


class _LazyOuterFactor(Factor):
    """``V`` of a weight ``[O, I]`` from lazy ``s`` ``[C, N, O, *out]`` and input ``a``.

    What the two lazy factors share: shapes, and the outer-product factor
    with ``s`` formed once (:meth:`formed`) for everything but the Gram
    contraction.

    Args:
        lazy: The factor at the layer's output.
        a: Unfolded input ``[N, T, I]``, or its blocks of samples.
        source: Identifies ``a`` (see :attr:`vivitlib.factors.Factor.source`).
    """

    def __init__(
        self,
        lazy: LazyColumns,
        a: Tensor | kernels.InputBlocks,
        source: object = None,
    ):
        self.lazy, self.a, self.source = lazy, a, source
        self._formed: Factor | None = None

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """``(C, N, T, O, I)``."""
        C, N, O = self.lazy.shape[:3]  # noqa: E741
        return C, N, prod(self.lazy.shape[3:]), O, self.a.shape[-1]

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.lazy.dtype

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self.lazy.device

    def formed(self) -> Factor:
        """The usual outer-product factor, ``s`` formed once."""
        if self._formed is None:
            C, N, T, O, _ = self.dims  # noqa: E741
            current_budget().note_excess(
                "a convolution's factor kept for lifting or gradient products "
                "(its output factor and unfolded input whole)",
                (C * N * T * O + N * T * self.dims[4]) * self.lazy.element_size(),
            )
            s = self.lazy.materialise().reshape(C, N, O, T).transpose(2, 3)
            a = kernels.whole_input(self.a)
            self._formed = _outer_factor(s, a, self.source)
        return self._formed

    def times_grads(self, grads: Grads) -> Tensor:  # noqa: D102
        return self.formed().times_grads(grads)

    def apply(self, coeffs: Tensor) -> Tensor:  # noqa: D102
        return self.formed().apply(coeffs)

    def project(self, directions: Tensor) -> Tensor:  # noqa: D102
        return self.formed().project(directions)

    def dense(self) -> Factor:  # noqa: D102
        return self.formed().dense()

    def scaled(self, scale: float) -> Factor:  # noqa: D102
        return self.formed().scaled(scale)

    def map_samples(self, fn, source=None) -> Factor:  # noqa: D102
        return self.formed().map_samples(fn, source)

    def stored_numel(self) -> int:  # noqa: D102
        C, N, T, O, I = self.dims  # noqa: E741
        return C * N * T * O + N * T * I

    def dense_numel(self) -> int:  # noqa: D102
        C, N, _, O, I = self.dims  # noqa: E741
        return C * N * O * I


class ChannelSlicedFactor(_LazyOuterFactor):
    """``V`` whose ``'dense'`` Gram plan forms ``s`` by slices of output channels.

    Args:
        lazy: The factor at the layer's output (:attr:`LazyColumns.narrowable`).
        a: Unfolded input ``[N, T, I]``, or its blocks of samples.
        source: Identifies ``a`` (see :attr:`vivitlib.factors.Factor.source`).
    """

    def contract(self, grads: Grads | None, keep: bool = False):  # noqa: D102
        if keep:
            return self.formed().contract(grads, keep)
        C, N, T, O, _ = self.dims  # noqa: E741

        def take(o0: int, o1: int) -> Tensor:
            part = self.lazy.channels(o0, o1).reshape(C, N, o1 - o0, T)
            return part.transpose(2, 3)

        gram, vtg = kernels.dense_plan_gram(
            kernels.OutputSlices((C, N, T, O), take),
            self.a,
            grads_slices(grads, O),
            chunk_elements=current_cost_model().slice_elements(C * N),
        )
        return gram, vtg, None


class SampleBlockedFactor(_LazyOuterFactor):
    """``V`` whose ``'pairwise'`` Gram plan forms ``s`` by blocks of samples.

    ``contract`` (without ``keep``) gives
    :func:`~vivitlib.factors.pairwise.pairwise_gram` ``s`` as
    :class:`~vivitlib.factors.pairwise.FactorBlocks`, each block formed from
    the lazy source in column chunks (the budget's
    :attr:`~vivitlib.memory.MemoryBudget.column_bytes`), and the output
    gradients ``Δ`` of the same input as its extra column (so ``Vᵀ g`` needs
    no formed ``s`` either).

    Args:
        lazy: The factor at the layer's output
            (:attr:`LazyColumns.sample_narrowable`).
        a: Unfolded input ``[N, T, I]``, or its blocks of samples.
        source: Identifies ``a`` (see :attr:`vivitlib.factors.Factor.source`).
    """

    def blocks(self) -> pairwise.FactorBlocks:
        """``s`` ``[C, N, T, O]`` a block of samples at a time, from the lazy source."""
        C, N, T, O, _ = self.dims  # noqa: E741
        lazy = self.lazy

        def take(n0: int, n1: int) -> Tensor:
            step = _columns_per_block(lazy, n1 - n0)
            if step >= C:
                block = lazy.columns(0, C, samples=(n0, n1))
            else:
                block = lazy.source.new_empty(C, n1 - n0, *lazy.shape[2:])
                for c0 in range(0, C, step):
                    c1 = min(C, c0 + step)
                    block[c0:c1] = lazy.columns(c0, c1, samples=(n0, n1))
            return block.reshape(C, n1 - n0, O, T).transpose(2, 3)

        return pairwise.FactorBlocks((C, N, T, O), take, like=lazy.source)

    def contract(self, grads: Grads | None, keep: bool = False):  # noqa: D102
        model = current_cost_model()
        if keep or model.gram_plan_for(*self.dims) != "pairwise":
            return self.formed().contract(grads, keep)
        shared = grads if self.shares_input(grads) else None
        delta = shared.delta if isinstance(shared, OuterGrads) else None
        gram, vtg = pairwise.pairwise_gram(
            self.blocks(),
            self.a,
            delta,
            chunk_elements=model.chunk_elements,
            workspace_elements=model.workspace_elements,
        )
        if vtg is None and grads is not None:
            vtg = self.times_grads(grads)
        return gram, vtg, None


def _columns_per_block(lazy: LazyColumns, samples: int) -> int:
    """Columns formed at a time for a block of ``samples`` samples.

    Chunks within the budget's
    :attr:`~vivitlib.memory.MemoryBudget.column_bytes`, or within the size of
    the block ``[C, samples, *features]`` where that is larger: the block is
    laid out into a slot of its size anyway
    (:func:`~vivitlib.factors.pairwise.pairwise_gram`), and one column at a
    time under a tiny budget would run every map ``C`` times per block
    (3C3D, ``N = 64``, ``max_memory=1``: the third convolution's Gram 1.24 s
    instead of 0.62 s).
    """
    per_column = lazy.sample_column_bytes() * samples
    block = lazy.numel() // lazy.shape[1] * samples * lazy.element_size()
    most = max(current_budget().column_bytes, block)
    return max(1, most // max(per_column, 1))
