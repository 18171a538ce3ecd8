"""Kronecker representation: a weight used once per sample (``T = 1``).

Column ``(c, n)`` of ``V`` is the outer product ``s_cn a_nᵀ``, so inner
products factorise, ``⟨v_cn, v_dm⟩ = ⟨s_cn, s_dm⟩ ⟨a_n, a_m⟩``: the Gram block
costs ``(C·N)²·O / 2 + N²·I / 2`` and ``[C, N, O·I]`` is never formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vivitlib.factors import kernels
from vivitlib.factors.base import Factor, Grads
from vivitlib.factors.dense import DenseFactor
from vivitlib.factors.outer import OuterFactor


class KroneckerFactor(OuterFactor):
    """``V`` of a plain linear (or 1-position convolution) weight, ``T = 1``."""

    def contract(self, grads: Grads | None, keep: bool = False):  # noqa: D102
        ss, aa = self.gram_parts()
        gram = ss.mul_(aa[None, :, None, :])
        vtg = None if grads is None else self.times_grads(grads)
        return gram, vtg, self if keep else None

    def gram_parts(self) -> tuple[Tensor, Tensor]:
        """``(⟨s_cn, s_dm⟩ [C, N, C, N], ⟨a_n, a_m⟩ [N, N])``, class-major.

        The Gram block is their product, ``[c, n, d, m] = ss[c, n, d, m] ·
        aa[n, m]``. ``ss`` alone is the Gram block of the layer's bias, whose
        factor is ``s`` itself (see :meth:`is_bias_factor`).
        """
        s, a = self.s[:, :, 0], self.a[:, 0]
        C, N = s.shape[:2]
        return kernels.sym_gram(s.reshape(C * N, -1)).view(C, N, C, N), a @ a.T

    @property
    def version(self) -> int:
        """Version counter of ``s``'s memory (changes with every in-place write)."""
        return self.s._version

    def is_bias_factor(self, factor: Factor, version: int | None = None) -> bool:
        """Whether ``factor`` is a dense factor stored in this one's ``s``.

        True for the bias of the same linear layer when BackPACK hands over
        the same memory (same address, shape, strides, dtype and device) and,
        if ``version`` is given, ``s`` has not been written since
        :attr:`version` read ``version``: its Gram block is then ``ss`` of
        :meth:`gram_parts` as computed then, no second product needed.
        """
        if not isinstance(factor, DenseFactor):
            return False
        s, v = self.s[:, :, 0], factor.v
        return (
            v.data_ptr() == s.data_ptr()
            and v.shape == s.shape
            and v.stride() == s.stride()
            and v.dtype == s.dtype
            and v.device == s.device
            and (version is None or v._version == version)
        )

    def times_grads(self, grads: Grads) -> Tensor:  # noqa: D102
        outer = self._outer_grads(grads)
        if outer is None:
            return self.dense().times_grads(grads)
        sd = torch.einsum("cno,mo->cnm", self.s[:, :, 0], outer.delta[:, 0])
        return sd * (self.a[:, 0] @ outer.a[:, 0].T)[None]
