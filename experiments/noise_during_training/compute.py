"""Per-direction gradient and curvature statistics on a fixed held-out batch.

For every nontrivial GGN direction ``k`` of the held-out batch: the eigenvalue λ_k,
the directional gradient γ_k, the gradient overlap γ_k²/‖g‖², and the signal-to-noise
ratios of the per-sample γ_nk and λ_nk (Dangel et al., 2022, *ViViT*, Section 4.1).
"""

from __future__ import annotations

import pandas as pd
from torch import Tensor, nn

from experiments.common.curvature import direction_table, low_rank_ggn


def noise_table(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, labels: Tensor
) -> pd.DataFrame:
    """Compute the per-direction statistics of the full GGN on one batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode).
        loss_fn: BackPACK-extended loss.
        inputs: Held-out inputs ``[N, ...]``.
        labels: Held-out labels ``[N]``.

    Returns:
        One row per nontrivial direction with the columns of
        :func:`experiments.common.curvature.direction_table` and ``loss``.

    """
    ggn = low_rank_ggn(model, loss_fn, inputs, labels)
    frame = direction_table(ggn.blocks[0])
    frame["loss"] = loss_fn(model(inputs), labels).item()
    return frame
