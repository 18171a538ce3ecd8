"""Project the GGN factor and per-sample gradients onto given directions.

For a direction ``d`` (shaped like the parameter) these give ``V_pᵀ d`` per
column and ``g_nᵀ d`` per sample without materialising factored pieces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vivitlib.extensions.factors import (
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
    if isinstance(factor, OuterFactor):
        d = directions.reshape(K, factor.s.shape[-1], -1).to(factor.dtype)
        da = torch.einsum("koi,nti->knto", d, factor.a)
        return torch.einsum("cnto,knto->cnk", factor.s, da)
    return torch.einsum(
        "cnd,kd->cnk", factor.v, directions.reshape(K, -1).to(factor.dtype)
    )


def project_grads(grads: Grads | Tensor, directions: Tensor) -> Tensor:
    """``⟨g_n, d_k⟩`` for every sample and direction, ``[N', K]``."""
    if isinstance(grads, Tensor):
        grads = DenseGrads(grads.flatten(1))
    K = directions.shape[0]
    if isinstance(grads, OuterGrads):
        d = directions.reshape(K, grads.delta.shape[-1], -1).to(grads.delta.dtype)
        da = torch.einsum("koi,nti->knto", d, grads.a)
        return torch.einsum("nto,knto->nk", grads.delta, da)
    return grads.g @ directions.reshape(K, -1).to(grads.g.dtype).T
