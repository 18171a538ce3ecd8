"""Project the GGN factor and per-sample gradients onto given directions.

For a direction ``d`` (shaped like the parameter) these give ``V_pᵀ d`` per
column and ``g_nᵀ d`` per sample without materialising factored pieces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vivitlib.factors.representations import (
    DenseFactor,
    DenseGrads,
    Factor,
    Grads,
    OuterFactor,
    OuterGrads,
)


def project_factor(factor: Factor | Tensor, directions: Tensor) -> Tensor:
    """``⟨v_cn, d_k⟩`` for every column and direction, ``[C, N, K]``.

    Args:
        factor: One parameter's factor (dense ``[C, N, *shape]`` tensor allowed).
        directions: ``[K, *param.shape]``.

    Returns:
        Projections in BackPACK's column order ``(c, n)``.
    """
    if isinstance(factor, Tensor):
        factor = DenseFactor(factor.flatten(2))
    K = directions.shape[0]
    if isinstance(factor, OuterFactor) and _outer_is_cheaper(factor.s, factor.a, K):
        d = directions.reshape(K, factor.s.shape[-1], -1).to(factor.dtype)
        da = torch.einsum("koi,nti->knto", d, factor.a)
        return torch.einsum("cnto,knto->cnk", factor.s, da)
    factor = factor.dense()
    return torch.einsum(
        "cnd,kd->cnk", factor.v, directions.reshape(K, -1).to(factor.dtype)
    )


def project_grads(grads: Grads | Tensor, directions: Tensor) -> Tensor:
    """``⟨g_n, d_k⟩`` for every sample and direction, ``[N', K]``."""
    if isinstance(grads, Tensor):
        grads = DenseGrads(grads.flatten(1))
    K = directions.shape[0]
    if isinstance(grads, OuterGrads) and _outer_is_cheaper(
        grads.delta[None], grads.a, K
    ):
        d = directions.reshape(K, grads.delta.shape[-1], -1).to(grads.delta.dtype)
        da = torch.einsum("koi,nti->knto", d, grads.a)
        return torch.einsum("nto,knto->nk", grads.delta, da)
    grads = grads.dense()
    return grads.g @ directions.reshape(K, -1).to(grads.g.dtype).T


def _outer_is_cheaper(s: Tensor, a: Tensor, K: int) -> bool:
    """Multiply-adds of projecting outer products directly vs materialising first.

    With ``s`` ``[C, N, T, O]`` and ``a`` ``[N, T, I]``: directly
    ``K·N·T·O·I + C·N·T·O·K``; materialised ``C·N·T·O·I + C·N·O·I·K``. Weight
    sharing (``T > 1``) favours materialising, plain linear layers the direct path.
    """
    C, N, T, O = s.shape
    I = a.shape[-1]  # noqa: E741
    direct = K * N * T * O * I + C * N * T * O * K
    materialised = C * N * T * O * I + C * N * O * I * K
    return direct <= materialised
