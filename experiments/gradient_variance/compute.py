"""Per-sample gradient variance and per-direction curvature variance on data batches.

For each batch of ``N`` training samples: the mini-batch gradient ``ḡ``, the trace of
the per-sample gradient covariance ``tr Σ = mean_n ‖g_n - ḡ‖²`` (from BackPACK's
``BatchGrad``), and along the GGN's top eigen-directions the mean curvature ``λ_k``
and the variance of the per-sample curvatures ``λ_nk`` (vivitlib's ``lambdas``).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor, nn

from experiments.common.curvature import direction_table, low_rank_ggn


def gradient_variance(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, labels: Tensor
) -> dict[str, float]:
    """Return ``‖ḡ‖²`` and ``tr Σ`` of the per-sample gradients of one batch."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model.zero_grad()
    with backpack(BatchGrad()):
        loss_fn(model(inputs), labels).backward()
    scale = len(labels) if loss_fn.reduction == "mean" else 1
    per_sample = torch.cat(
        [p.grad_batch.flatten(1) * scale for p in model.parameters()], dim=1
    ).to(torch.float64)
    mean = per_sample.mean(0)
    return {
        "grad_norm_sq": mean.square().sum().item(),
        "grad_var_trace": (per_sample - mean).square().sum(1).mean().item(),
    }


def variance_table(
    model: nn.Module, loss_fn: nn.Module, batches: list, top_k: int = 20
) -> pd.DataFrame:
    """Compute gradient and curvature variance on each batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode).
        loss_fn: BackPACK-extended loss.
        batches: ``(inputs, labels)`` batches of training data.
        top_k: Number of top GGN directions reported per batch. Default: ``20``.

    Returns:
        One row per (batch, direction ``k < top_k``) with the columns of
        :func:`experiments.common.curvature.direction_table`, ``batch``,
        ``grad_norm_sq``, ``grad_var_trace`` and ``lambda_frac_snr_gt1`` (the
        fraction of all nontrivial directions whose curvature SNR exceeds 1).

    """
    frames = []
    for index, (inputs, labels) in enumerate(batches):
        grads = gradient_variance(model, loss_fn, inputs, labels)
        ggn = low_rank_ggn(model, loss_fn, inputs, labels)
        table = direction_table(ggn.blocks[0])
        frac = float((table["lambda_snr"] > 1).mean())
        table = table.head(top_k).assign(batch=index, **grads, lambda_frac_snr_gt1=frac)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)
