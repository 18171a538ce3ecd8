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

from vivitlib.factors import kernels


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

    ``s``: ``[C, N, T, O]`` backpropagated factor; ``a``: ``[N, T, I]`` input;
    ``source``: identifies ``a`` (layer and samples): a factor and gradients with
    equal, non-``None`` sources share their input (no tensor comparison, which
    would synchronise with an accelerator).
    """

    s: Tensor
    a: Tensor
    source: object = None

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the factor."""
        return self.s.dtype

    def dense(self) -> DenseFactor:
        """Materialise ``[C, N, O·I]``."""
        return DenseFactor(kernels.outer_dense(self.s, self.a))


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

    ``delta``: ``[N', T, O]`` output gradients; ``a``: ``[N', T, I]`` input;
    ``source`` as for :class:`OuterFactor`.
    """

    delta: Tensor
    a: Tensor
    source: object = None

    def total(self) -> Tensor:
        """Sum over samples, ``[O·I]``."""
        return torch.einsum("nto,nti->oi", self.delta, self.a).flatten()

    def dense(self) -> DenseGrads:
        """Materialise ``[N', O·I]``."""
        return DenseGrads(kernels.grads_dense(self.delta, self.a))


Factor = DenseFactor | OuterFactor
Grads = DenseGrads | OuterGrads


def outer_costs(C: int, N: int, T: int, O: int, I: int) -> dict[str, int]:  # noqa: E741
    """Multiply-adds of each Gram plan of an outer-product factor (the cost model).

    ``T = 1`` (plain linear layers): ``⟨v_cn, v_dm⟩ = ⟨s_cn, s_dm⟩ ⟨a_n, a_m⟩``,
    ``'outer'``: ``(C·N)²·O / 2 + N²·I / 2``. Otherwise (see :mod:`.kernels`)

    * ``'dense'``: ``C·N·T·O·I + (C·N)²·O·I / 2``;
    * ``'pairwise'``: ``N²·T²·I / 2 + N²·T²·C·O / 2 + N²·C²·T·O / 2``.

    Both keep intermediates chunked, so memory does not enter the choice.
    """
    if T == 1:
        return {"outer": (C * N) ** 2 * O // 2 + N**2 * I // 2}
    return {
        "dense": C * N * T * O * I + (C * N) ** 2 * O * I // 2,
        "pairwise": (N * T) ** 2 * (I + C * O) // 2 + (N * C) ** 2 * T * O // 2,
    }


def dense_cost(C: int, N: int, D: int) -> int:
    """Multiply-adds of the Gram block of a dense ``[C, N, D]`` factor."""
    return (C * N) ** 2 * D // 2


def outer_plan(C: int, N: int, T: int, O: int, I: int) -> str:  # noqa: E741
    """Cheapest plan of :func:`outer_costs`: 'outer', 'dense' or 'pairwise'."""
    costs = outer_costs(C, N, T, O, I)
    return min(costs, key=costs.get)


def _plan(factor: OuterFactor) -> str:
    C, N, T, O = factor.s.shape  # noqa: E741
    return outer_plan(C, N, T, O, factor.a.shape[-1])


def _rows(v: Tensor) -> tuple[Tensor, bool]:
    """``V`` ``[C, N, D]`` as contiguous rows ``[M, D]``; whether sample-major."""
    if v.transpose(0, 1).is_contiguous():
        return v.transpose(0, 1).flatten(end_dim=1), True
    return v.reshape(-1, v.shape[-1]), False


def _to_backpack_order(gram_nm: Tensor) -> Tensor:
    """``[N, C, N, C]`` (sample-major) as a view in BackPACK order."""
    return gram_nm.permute(1, 0, 3, 2)


def factor_times_grads(factor: Factor, grads: Grads) -> Tensor:
    """``V_pᵀ g_m`` for every column and sample, ``[C, N, N']``."""
    if isinstance(factor, OuterFactor) and isinstance(grads, OuterGrads):
        s, a = factor.s, factor.a
        if s.shape[2] == 1:
            sd = torch.einsum("cno,mo->cnm", s[:, :, 0], grads.delta[:, 0])
            return sd * (a[:, 0] @ grads.a[:, 0].T)[None]
        if _plan(factor) == "pairwise":
            vtg = kernels.pairwise_times_grads(s, a, grads.delta, grads.a)
            return vtg.transpose(0, 1)
    return _dense_times_grads(factor.dense().v, grads)


def _dense_times_grads(v: Tensor, grads: Grads) -> Tensor:
    rows, sample_major = _rows(v)
    C, N = v.shape[:2]
    vtg = rows @ grads.dense().g.T
    if sample_major:
        return vtg.reshape(N, C, -1).transpose(0, 1)
    return vtg.reshape(C, N, -1)


def contract(
    factor: Factor, grads: Grads | None, keep: bool = False
) -> tuple[Tensor, Tensor | None, Factor | None]:
    """Gram contribution and ``Vᵀ g`` of one parameter, sharing work between them.

    Args:
        factor: The parameter's factor.
        grads: Its per-sample gradients, or ``None``.
        keep: Whether to return a representation to keep for lifting.

    Returns:
        ``(gram, vtg, kept)``: ``[C, N, C, N]`` and ``[C, N, N']`` (or ``None``)
        in BackPACK order (possibly as permuted views), and what to keep (see
        :func:`keep_as`; ``None`` unless ``keep``).
    """
    if isinstance(factor, OuterFactor) and factor.s.shape[2] == 1:
        s, a = factor.s[:, :, 0], factor.a[:, 0]
        C, N = s.shape[:2]
        gram = kernels.sym_gram(s.reshape(C * N, -1)).view(C, N, C, N)
        gram.mul_((a @ a.T)[None, :, None, :])
        vtg = None if grads is None else factor_times_grads(factor, grads)
        return gram, vtg, factor if keep else None
    if isinstance(factor, OuterFactor) and _plan(factor) == "pairwise":
        shared = (
            isinstance(grads, OuterGrads)
            and factor.source is not None
            and grads.source == factor.source
        )
        gram, vtg = kernels.pairwise_gram(
            factor.s, factor.a, grads.delta if shared else None
        )
        if vtg is not None:
            vtg = vtg.transpose(0, 1)
        elif grads is not None:
            vtg = factor_times_grads(factor, grads)
        return _to_backpack_order(gram), vtg, keep_as(factor) if keep else None
    dense = factor.dense()
    rows, sample_major = _rows(dense.v)
    C, N = dense.v.shape[:2]
    gram = kernels.sym_gram(rows)
    if sample_major:
        gram = _to_backpack_order(gram.reshape(N, C, N, C))
    else:
        gram = gram.reshape(C, N, C, N)
    vtg = None if grads is None else _dense_times_grads(dense.v, grads)
    return gram, vtg, keep_as(factor, dense) if keep else None


def keep_as(
    factor: Factor, dense: DenseFactor | None = None, dense_ratio: float = 4.0
) -> Factor:
    """What to keep of a factor for lifting: dense if at most ``dense_ratio`` × larger.

    Applying a dense ``V`` to ``K`` coefficient vectors costs ``K·C·N·O·I``, the
    outer form ``K·N·T·O·I`` (``T`` times more work per column than per sample);
    the dense form is kept when its memory is within ``dense_ratio`` of the
    factors'. ``dense`` is an already materialised ``V`` to reuse.
    """
    if isinstance(factor, DenseFactor) or factor.s.shape[2] == 1:
        return factor
    C, N, _, O = factor.s.shape  # noqa: E741
    dense_size = C * N * O * factor.a.shape[-1]
    if dense_size <= dense_ratio * (factor.s.numel() + factor.a.numel()):
        return factor.dense() if dense is None else dense
    return factor


def factor_apply(factor: Factor, coeffs: Tensor) -> Tensor:
    """Apply ``V_p`` to coefficients: ``Σ_{c,n} coeffs[c,n,k] v_cn``, ``[K, D_p]``."""
    coeffs = coeffs.to(factor.dtype)
    if isinstance(factor, OuterFactor):
        u = torch.einsum("cnk,cnto->knto", coeffs, factor.s)
        return torch.einsum("knto,nti->koi", u, factor.a).flatten(1)
    rows, sample_major = _rows(factor.v)
    if sample_major:
        coeffs = coeffs.transpose(0, 1)
    return coeffs.reshape(rows.shape[0], -1).T @ rows
