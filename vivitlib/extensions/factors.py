"""Per-parameter pieces of the GGN factor ``V`` and of per-sample gradients.

Two representations, each knowing how to contract itself:

* dense: ``V_p`` as ``[C, N, D_p]`` (BackPACK's layout), gradients as ``[N', D_p]``;
* outer product (linear and convolution weights): column ``(c, n)`` of ``V_p`` is
  ``Σ_t s_cnt a_ntᵀ`` with backpropagated factor ``s`` ``[C, N, T, O]`` and layer
  input ``a`` ``[N, T, I]`` (``T`` positions: 1 for a plain linear layer,
  sequence length or output pixels otherwise); per-sample gradients likewise
  ``Σ_t δ_nt a_ntᵀ``. Inner products then factorise,
  ``⟨v_cn, v_c'm⟩ = Σ_{t,u} ⟨s_cnt, s_c'mu⟩ ⟨a_nt, a_mu⟩``, and the ``[C, N, O·I]``
  tensor is never formed.

All contractions return BackPACK's column order ``(c, n)``; the caller permutes
the (small) results to the public sample-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DenseFactor:
    """``V`` of one parameter, ``[C, N, D_p]``."""

    v: Tensor

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the factor."""
        return self.v.dtype

    def dense(self) -> DenseFactor:
        """Return self."""
        return self


@dataclass
class OuterFactor:
    """``V`` of one weight as outer products.

    ``s``: ``[C, N, T, O]`` backpropagated factor; ``a``: ``[N, T, I]`` input.
    """

    s: Tensor
    a: Tensor

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the factor."""
        return self.s.dtype

    def dense(self) -> DenseFactor:
        """Materialise ``[C, N, O·I]``."""
        v = torch.einsum("cnto,nti->cnoi", self.s, self.a)
        return DenseFactor(v.flatten(2))


@dataclass
class DenseGrads:
    """Per-sample gradients of one parameter, ``[N', D_p]``."""

    g: Tensor

    def total(self) -> Tensor:
        """Sum over samples, ``[D_p]``."""
        return self.g.sum(0)

    def dense(self) -> DenseGrads:
        """Return self."""
        return self


@dataclass
class OuterGrads:
    """Per-sample weight gradients ``Σ_t δ_nt a_ntᵀ``.

    ``delta``: ``[N', T, O]`` output gradients; ``a``: ``[N', T, I]`` input.
    """

    delta: Tensor
    a: Tensor

    def total(self) -> Tensor:
        """Sum over samples, ``[O·I]``."""
        return torch.einsum("nto,nti->oi", self.delta, self.a).flatten()

    def dense(self) -> DenseGrads:
        """Materialise ``[N', O·I]``."""
        return DenseGrads(torch.einsum("nto,nti->noi", self.delta, self.a).flatten(1))


Factor = DenseFactor | OuterFactor
Grads = DenseGrads | OuterGrads


def factor_gram(factor: Factor) -> Tensor:
    """Gram contribution ``V_pᵀ V_p`` in BackPACK order, ``[C, N, C, N]``."""
    if isinstance(factor, OuterFactor):
        s, a = factor.s, factor.a
        if s.shape[2] == 1:
            ss = torch.einsum("cno,dmo->cndm", s[:, :, 0], s[:, :, 0])
            aa = a[:, 0] @ a[:, 0].T
            return ss * aa[None, :, None, :]
        aa = torch.einsum("nti,mui->ntmu", a, a)
        return torch.einsum("cnto,dmuo,ntmu->cndm", s, s, aa)
    v = factor.v
    C, N = v.shape[:2]
    flat = v.reshape(C * N, -1)
    return (flat @ flat.T).reshape(C, N, C, N)


def factor_times_grads(factor: Factor, grads: Grads) -> Tensor:
    """``V_pᵀ g_m`` for every column and sample, ``[C, N, N']``."""
    if isinstance(factor, OuterFactor) and isinstance(grads, OuterGrads):
        s, a = factor.s, factor.a
        if s.shape[2] == 1:
            sd = torch.einsum("cno,mo->cnm", s[:, :, 0], grads.delta[:, 0])
            return sd * (a[:, 0] @ grads.a[:, 0].T)[None]
        aa = torch.einsum("nti,mui->ntmu", a, grads.a)
        return torch.einsum("cnto,muo,ntmu->cnm", s, grads.delta, aa)
    if isinstance(factor, OuterFactor):
        g = grads.dense().g.reshape(-1, factor.s.shape[-1], factor.a.shape[-1])
        ga = torch.einsum("moi,nti->nmto", g, factor.a)
        return torch.einsum("cnto,nmto->cnm", factor.s, ga)
    v = factor.v
    return torch.einsum("cnd,md->cnm", v, grads.dense().g)


def factor_apply(factor: Factor, coeffs: Tensor) -> Tensor:
    """Apply ``V_p`` to coefficients: ``Σ_{c,n} coeffs[c,n,k] v_cn``, ``[K, D_p]``."""
    coeffs = coeffs.to(factor.dtype)
    if isinstance(factor, OuterFactor):
        u = torch.einsum("cnk,cnto->knto", coeffs, factor.s)
        return torch.einsum("knto,nti->koi", u, factor.a).flatten(1)
    return torch.einsum("cnk,cnd->kd", coeffs, factor.v)
