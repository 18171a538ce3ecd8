"""Evaluate Papyan's hierarchy on a batch (exact, Gram contractions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import Tensor, nn

from experiments.common.curvature import low_rank_ggn
from experiments.papyan_hierarchy.decomposition import part_spectra


def batch_hierarchy_table(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, labels: Tensor
) -> pd.DataFrame:
    """Compute the nonzero spectra of ``G``, ``A1``, ``A2``, ``B1``, ``B2`` on a batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode).
        loss_fn: BackPACK-extended cross-entropy loss.
        inputs: Inputs ``[N, ...]``.
        labels: Labels ``[N]``.

    Returns:
        One row per eigenvalue with columns ``matrix``, ``k``, ``eigenvalue``.

    """
    ggn = low_rank_ggn(model, loss_fn, inputs, labels, compute=("eigenvalues",))
    probs = model(inputs).softmax(dim=1)
    spectra = part_spectra(ggn.blocks[0].gram, probs, labels)
    frames = [
        pd.DataFrame(
            {
                "matrix": name,
                "k": np.arange(len(evals)),
                "eigenvalue": evals.cpu().numpy(),
            }
        )
        for name, evals in spectra.items()
    ]
    return pd.concat(frames, ignore_index=True)


def summarize(table: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Rank, trace and largest eigenvalue of every matrix, per batch.

    The parts' traces sum to the trace of ``G`` (``trace_share`` sums to one).
    """
    stats = (
        table.groupby([*group, "matrix"], sort=False)["eigenvalue"]
        .agg(rank="count", trace="sum", top="max")
        .reset_index()
    )
    total = stats.loc[stats["matrix"] == "G", [*group, "trace"]]
    stats = stats.merge(total.rename(columns={"trace": "ggn_trace"}), on=group)
    stats["trace_share"] = stats["trace"] / stats.pop("ggn_trace")
    return stats
