"""Kronecker representation: a weight used once per sample (``T = 1``).

Column ``(c, n)`` of ``V`` is the outer product ``s_cn a_nᵀ``, so inner
products factorise, ``⟨v_cn, v_dm⟩ = ⟨s_cn, s_dm⟩ ⟨a_n, a_m⟩``: the Gram block
costs ``(C·N)²·O / 2 + N²·I / 2`` and ``[C, N, O·I]`` is never formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vivitlib.factors import kernels
from vivitlib.factors.base import Grads
from vivitlib.factors.outer import OuterFactor


class KroneckerFactor(OuterFactor):
    """``V`` of a plain linear (or 1-position convolution) weight, ``T = 1``."""

    def contract(self, grads: Grads | None, keep: bool = False):  # noqa: D102
        s, a = self.s[:, :, 0], self.a[:, 0]
        C, N = s.shape[:2]
        gram = kernels.sym_gram(s.reshape(C * N, -1)).view(C, N, C, N)
        gram.mul_((a @ a.T)[None, :, None, :])
        vtg = None if grads is None else self.times_grads(grads)
        return gram, vtg, self if keep else None

    def times_grads(self, grads: Grads) -> Tensor:  # noqa: D102
        outer = self._outer_grads(grads)
        if outer is None:
            return self.dense().times_grads(grads)
        sd = torch.einsum("cno,mo->cnm", self.s[:, :, 0], outer.delta[:, 0])
        return sd * (self.a[:, 0] @ outer.a[:, 0].T)[None]
