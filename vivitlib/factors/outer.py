"""Outer-product pieces shared by the linear and convolution representations.

For a weight ``[O, I]`` (``I = C_in · kernel size`` for convolutions), column
``(c, n)`` of ``V`` is ``v_cn = Σ_t s_cnt a_ntᵀ`` with backpropagated factor
``s`` ``[C, N, T, O]`` and layer input ``a`` ``[N, T, I]`` (``T`` positions
sharing the weight: 1 for a plain linear layer, sequence length or output
pixels otherwise); per-sample gradients likewise ``g_n = Σ_t δ_nt a_ntᵀ``.

What does not depend on ``T`` -- lifting, projections, materialising,
rescaling, per-sample maps -- is implemented once in :class:`OuterFactor`;
the Gram contraction, where ``T = 1`` and ``T > 1`` differ, lives in the two
representations :class:`~vivitlib.factors.kronecker.KroneckerFactor` and
:class:`~vivitlib.factors.unfolded.UnfoldedFactor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vivitlib.factors import kernels
from vivitlib.factors.base import Factor, Grads, SampleMap
from vivitlib.factors.costs import current_cost_model
from vivitlib.factors.dense import DenseFactor, DenseGrads


@dataclass
class OuterGrads(Grads):
    """Per-sample weight gradients ``Σ_t δ_nt a_ntᵀ``.

    ``delta``: ``[N', T, O]`` output gradients; ``a``: ``[N', T, I]`` input;
    ``source``: identifies ``a`` (layer and samples): a factor and gradients
    with equal, non-``None`` sources share their input (no tensor comparison,
    which would synchronise with an accelerator).
    """

    delta: Tensor
    a: Tensor
    source: object = None

    @property
    def num_samples(self) -> int:  # noqa: D102
        return self.delta.shape[0]

    def total(self) -> Tensor:  # noqa: D102
        chunk = current_cost_model().chunk_elements
        sums = kernels.position_sums(self.delta[None], self.a, chunk_elements=chunk)
        return sums.flatten()

    def dense(self) -> DenseGrads:  # noqa: D102
        return DenseGrads(kernels.grads_dense(self.delta, self.a))

    def project(self, directions: Tensor) -> Tensor:  # noqa: D102
        N, T, O = self.delta.shape  # noqa: E741
        K, I = directions.shape[0], self.a.shape[-1]  # noqa: E741
        if not current_cost_model().project_directly(1, N, T, O, I, K):
            return self.dense().project(directions)
        d = directions.reshape(K, O, I).to(self.delta.dtype)
        da = kernels.input_products(d, self.a)
        return torch.einsum("nto,knto->nk", self.delta, da)

    def scaled(self, scale: float) -> OuterGrads:  # noqa: D102
        return OuterGrads(self.delta * scale, self.a, self.source)

    def map_samples(  # noqa: D102
        self, fn: SampleMap, source=None, input_like: Factor | None = None
    ) -> OuterGrads:
        a = input_like.a if isinstance(input_like, OuterFactor) else fn(self.a, 0)
        return OuterGrads(fn(self.delta, 0), a, source)

    def stored_numel(self, input_shared: bool = False) -> int:  # noqa: D102
        return self.delta.numel() + (0 if input_shared else self.a.numel())

    def dense_numel(self) -> int:  # noqa: D102
        return self.delta.shape[0] * self.delta.shape[-1] * self.a.shape[-1]


@dataclass
class OuterFactor(Factor):
    """``V`` of one weight as outer products ``Σ_t s_cnt a_ntᵀ``.

    ``s``: ``[C, N, T, O]``; ``a``: ``[N, T, I]``; ``source`` as for
    :class:`OuterGrads`. Build with :func:`vivitlib.factors.outer_factor`,
    which picks the representation for ``T``.
    """

    s: Tensor
    a: Tensor
    source: object = None

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.s.dtype

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self.s.device

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """``(C, N, T, O, I)``, the shapes the cost model reads."""
        C, N, T, O = self.s.shape  # noqa: E741
        return C, N, T, O, self.a.shape[-1]

    def apply(self, coeffs: Tensor) -> Tensor:  # noqa: D102
        coeffs = coeffs.to(self.dtype)
        u = torch.einsum("cnk,cnto->knto", coeffs, self.s)
        chunk = current_cost_model().chunk_elements
        return kernels.position_sums(u, self.a, chunk_elements=chunk).flatten(1)

    def project(self, directions: Tensor) -> Tensor:  # noqa: D102
        C, N, T, O, I = self.dims  # noqa: E741
        K = directions.shape[0]
        if not current_cost_model().project_directly(C, N, T, O, I, K):
            return self.dense().project(directions)
        d = directions.reshape(K, O, I).to(self.dtype)
        da = kernels.input_products(d, self.a)
        return torch.einsum("cnto,knto->cnk", self.s, da)

    def dense(self) -> DenseFactor:  # noqa: D102
        return DenseFactor(kernels.outer_dense(self.s, self.a))

    def scaled(self, scale: float) -> OuterFactor:  # noqa: D102
        return type(self)(self.s * scale, self.a, self.source)

    def map_samples(self, fn: SampleMap, source=None) -> OuterFactor:  # noqa: D102
        return type(self)(fn(self.s, 1), fn(self.a, 0), source)

    def stored_numel(self) -> int:  # noqa: D102
        return self.s.numel() + self.a.numel()

    def dense_numel(self) -> int:  # noqa: D102
        C, N, _, O, I = self.dims  # noqa: E741
        return C * N * O * I

    def _outer_grads(self, grads: Grads) -> OuterGrads | None:
        """``grads`` if they come in outer form for this weight, else ``None``."""
        return grads if isinstance(grads, OuterGrads) else None


def grads_slices(grads: Grads | None, O: int):  # noqa: E741
    """``(o0, o1) ->`` the gradients' dense slice of outputs ``[o0, o1)``, or None.

    For a weight with ``O`` outputs; outer-form gradients are formed slice by
    slice, dense ones viewed.
    """
    if grads is None:
        return None
    if isinstance(grads, OuterGrads):
        return lambda o0, o1: kernels.grads_dense(grads.delta[..., o0:o1], grads.a)
    g = grads.dense().g
    return lambda o0, o1: g.view(g.shape[0], O, -1)[:, o0:o1].flatten(1)
