"""Dense representation: ``V_p`` as ``[C, N, D_p]``, gradients as ``[N', D_p]``.

BackPACK's own layout, used for every layer without a factored handler, and
the form an outer-product factor takes once materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vivitlib.factors import kernels
from vivitlib.factors.base import Factor, Grads, SampleMap


@dataclass
class DenseGrads(Grads):
    """Per-sample gradients ``[N', D_p]``."""

    g: Tensor

    @classmethod
    def of(cls, grads: Tensor) -> DenseGrads:
        """From BackPACK's ``[N', *param.shape]``."""
        return cls(grads.flatten(1))

    @property
    def num_samples(self) -> int:  # noqa: D102
        return self.g.shape[0]

    def total(self) -> Tensor:  # noqa: D102
        return self.g.sum(0)

    def dense(self) -> DenseGrads:  # noqa: D102
        return self

    def project(self, directions: Tensor) -> Tensor:  # noqa: D102
        K = directions.shape[0]
        return self.g @ directions.reshape(K, -1).to(self.g.dtype).T

    def scaled(self, scale: float) -> DenseGrads:  # noqa: D102
        return DenseGrads(self.g * scale)

    def map_samples(self, fn: SampleMap, source=None, input_like=None) -> DenseGrads:  # noqa: D102
        return DenseGrads(fn(self.g, 0))

    def stored_numel(self, input_shared: bool = False) -> int:  # noqa: D102
        return self.g.numel()

    def dense_numel(self) -> int:  # noqa: D102
        return self.g.numel()


@dataclass
class DenseFactor(Factor):
    """``V_p`` as ``[C, N, D_p]`` (either memory layout of the first two axes)."""

    v: Tensor

    @classmethod
    def of(cls, factor: Tensor) -> DenseFactor:
        """From BackPACK's ``[C, N, *param.shape]``."""
        return cls(factor.flatten(2))

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.v.dtype

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self.v.device

    def contract(self, grads: Grads | None, keep: bool = False):  # noqa: D102
        rows, sample_major = self._rows()
        C, N = self.v.shape[:2]
        gram = kernels.sym_gram(rows)
        if sample_major:
            gram = gram.view(N, C, N, C).permute(1, 0, 3, 2)
        else:
            gram = gram.view(C, N, C, N)
        vtg = None if grads is None else self.times_grads(grads)
        return gram, vtg, self if keep else None

    def times_grads(self, grads: Grads) -> Tensor:  # noqa: D102
        rows, sample_major = self._rows()
        C, N = self.v.shape[:2]
        vtg = rows @ grads.dense().g.T
        if sample_major:
            return vtg.view(N, C, -1).transpose(0, 1)
        return vtg.view(C, N, -1)

    def apply(self, coeffs: Tensor) -> Tensor:  # noqa: D102
        coeffs = coeffs.to(self.dtype)
        rows, sample_major = self._rows()
        if sample_major:
            coeffs = coeffs.transpose(0, 1)
        return coeffs.reshape(rows.shape[0], -1).T @ rows

    def project(self, directions: Tensor) -> Tensor:  # noqa: D102
        K = directions.shape[0]
        d = directions.reshape(K, -1).to(self.dtype)
        return torch.einsum("cnd,kd->cnk", self.v, d)

    def dense(self) -> DenseFactor:  # noqa: D102
        return self

    def scaled(self, scale: float) -> DenseFactor:  # noqa: D102
        return DenseFactor(self.v * scale)

    def map_samples(self, fn: SampleMap, source=None) -> DenseFactor:  # noqa: D102
        return DenseFactor(fn(self.v, 1))

    def stored_numel(self) -> int:  # noqa: D102
        return self.v.numel()

    def dense_numel(self) -> int:  # noqa: D102
        return self.v.numel()

    def _rows(self) -> tuple[Tensor, bool]:
        """``V`` as contiguous rows ``[C·N, D]`` (a view); whether sample-major.

        BackPACK may hand over a factor whose samples are the outer axis in
        memory; its rows are then read in that order, and the results are
        returned as class-major views.
        """
        v = self.v
        if v.transpose(0, 1).is_contiguous():
            return v.transpose(0, 1).flatten(end_dim=1), True
        return v.reshape(-1, v.shape[-1]), False
