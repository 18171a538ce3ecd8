"""Per-direction gradient and curvature statistics on a fixed held-out batch.

For every GGN direction ``k`` of the held-out batch: the eigenvalue λ_k, the
directional gradient γ_k, the gradient overlap γ_k²/‖g‖², and the signal-to-noise
ratios of the per-sample γ_nk and λ_nk (Dangel et al., 2022, *ViViT*, Section 4.1).
The pass runs in float64 by default, so that the directions kept are those of the
network down to ``~1e-13 · λ_max`` rather than those above float32's round-off; the
study then reports its counts at fixed fractions of ``λ_max``
(:mod:`experiments.noise_during_training.summary`).

Columns of the table (one row per direction, descending eigenvalue):

* ``k``, ``eigenvalue`` (λ_k), ``gamma`` (γ_k, mean of γ_nk), ``abs_gamma``;
* ``lambda_mean`` (mean of λ_nk, equals λ_k), ``gamma_var`` / ``lambda_var``
  (variance over the samples), ``gamma_snr`` / ``lambda_snr`` (mean² / variance);
* ``overlap``: γ_k² / ‖g‖², the share of the squared gradient norm along ``e_k``;
* ``num_nontrivial`` (K, the number of rows: a round-off cut-off of the evaluation
  precision, not a property of the network) and ``flat_overlap``
  (1 − Σ_k overlap, which therefore depends on that cut-off);
* ``loss`` (on the batch), ``precision`` (``float32`` or ``float64``).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor, nn

from experiments.common.curvature import direction_table, in_precision, low_rank_ggn


def noise_table(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    precision: str = "float64",
) -> pd.DataFrame:
    """Compute the per-direction statistics of the full GGN on one batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode); cast in place.
        loss_fn: BackPACK-extended loss.
        inputs: Held-out inputs ``[N, ...]``.
        labels: Held-out labels ``[N]``.
        precision: Evaluation precision. Default: ``'float64'``.

    Returns:
        One row per direction with the columns listed in the module docstring.

    """
    model, inputs = in_precision(model, inputs, precision)
    ggn = low_rank_ggn(model, loss_fn, inputs, labels)
    frame = direction_table(ggn.blocks[0])
    with torch.no_grad():
        frame["loss"] = loss_fn(model(inputs), labels).item()
    frame["precision"] = precision
    return frame
