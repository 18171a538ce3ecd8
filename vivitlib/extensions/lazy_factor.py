"""A convolution weight's factor whose output factor ``s`` is lazy, by channel slices.

For a weight-shared layer with a large dense ``V`` (3C3D's second convolution:
``V`` 141 MiB, ``s`` 34 MiB at ``N = 64``), the ``'dense'`` Gram plan already
forms ``V`` a slice of output channels at a time
(:func:`vivitlib.factors.kernels.dense_plan_gram`). When ``s`` itself is lazy
(:class:`~vivitlib.extensions.lazy.LazyColumns`) and every pending map can
form a subset of channels alone (activations, max pooling, flatten,
convolutions with ``groups=1``), the same slices of ``s`` are formed from the
lazy source, so neither ``s`` nor ``V`` exists whole: memory holds the lazy
source, the unfolded input (or, under a small budget, one block of it:
:class:`~vivitlib.factors.kernels.InputBlocks`) and one slice. (Maps every
slice would rerun whole -- up to a previous convolution's ``Jᵀ`` -- are
formed once before, :func:`~vivitlib.extensions.lazy_layers.sliceable`.)

Everything else a factor offers (lifting, projections, the exchange between
ranks) forms ``s`` once and hands over to
:class:`~vivitlib.factors.UnfoldedFactor`.
"""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor

from vivitlib.extensions.lazy import LazyColumns
from vivitlib.factors import Factor, Grads, current_cost_model, kernels
from vivitlib.factors import outer_factor as _outer_factor
from vivitlib.factors.outer import grads_slices


class ChannelSlicedFactor(Factor):
    """``V`` of a weight ``[O, I]`` from lazy ``s`` ``[C, N, O, *out]`` and input ``a``.

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
            s = self.lazy.materialise().reshape(C, N, O, T).transpose(2, 3)
            a = kernels.whole_input(self.a)
            self._formed = _outer_factor(s, a, self.source)
        return self._formed

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
            chunk_elements=current_cost_model().materialise_elements,
        )
        return gram, vtg, None

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
