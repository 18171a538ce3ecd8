"""Exact, curvature-sub-sampled and Monte-Carlo GGN spectra on one mini-batch.

Three ways of building ``V`` at different cost (Dangel et al., 2022, *ViViT*,
Section 2.4): the exact factor on all ``N`` samples (``N·C`` columns), the exact
factor on a fraction of the samples (``N·C/8`` columns, rescaled to the fraction's
size) and one Monte-Carlo sample per data point (``N`` columns).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import wasserstein_distance
from torch import Tensor, nn

from experiments.common.curvature import eigenvalues, low_rank_ggn


def approximation_settings(batch_size: int, fraction: int = 8) -> dict[str, dict]:
    """Return ``LowRankGGN`` keyword arguments of each approximation, by name."""
    keep = max(1, batch_size // fraction)
    return {
        "exact": {},
        f"subsampled_1/{fraction}": {"subsampling": range(keep)},
        "mc_1": {"mc_samples": 1},
    }


def spectra_table(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    fraction: int = 8,
) -> pd.DataFrame:
    """Compute the nontrivial GGN spectrum of each approximation on one batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode).
        loss_fn: BackPACK-extended loss.
        inputs: Inputs ``[N, ...]``.
        labels: Labels ``[N]``.
        fraction: Curvature sub-sampling keeps ``N // fraction`` samples.
            Default: ``8``.

    Returns:
        One row per eigenvalue with columns ``method``, ``k``, ``eigenvalue``,
        ``num_columns`` (the number of columns of ``V``).

    """
    frames = []
    settings = approximation_settings(len(labels), fraction)
    num_outputs = model(inputs[:1]).shape[1]
    for method, kwargs in settings.items():
        ggn = low_rank_ggn(
            model, loss_fn, inputs, labels, compute=("eigenvalues",), **kwargs
        )
        evals = eigenvalues(ggn.blocks[0])
        if "subsampling" in kwargs:
            columns = len(kwargs["subsampling"]) * num_outputs
        else:
            columns = len(labels) * (kwargs.get("mc_samples") or num_outputs)
        frames.append(
            pd.DataFrame(
                {
                    "method": method,
                    "k": np.arange(len(evals)),
                    "eigenvalue": evals,
                    "num_columns": columns,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def distances(table: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Compare each approximate spectrum with the exact one.

    The distance is the 1-Wasserstein distance between the empirical distributions
    of ``log10`` of the nontrivial eigenvalues (the shape of the spectrum, bulk and
    outliers alike); also reported: number of nontrivial eigenvalues, largest
    eigenvalue and trace, each relative to the exact spectrum.

    Args:
        table: Concatenated :func:`spectra_table` outputs.
        group: Columns that identify one batch (e.g. problem, step).

    Returns:
        One row per (batch, method).

    """
    rows = []
    for key, frame in table.groupby(group):
        exact = frame.loc[frame["method"] == "exact", "eigenvalue"].to_numpy()
        for method, approx in frame.groupby("method", sort=False):
            values = approx["eigenvalue"].to_numpy()
            rows.append(
                {
                    **dict(zip(group, key, strict=True)),
                    "method": method,
                    "num_nontrivial": len(values),
                    "wasserstein_log10": wasserstein_distance(
                        np.log10(exact), np.log10(values)
                    ),
                    "top_ratio": values.max() / exact.max(),
                    "trace_ratio": values.sum() / exact.sum(),
                }
            )
    return pd.DataFrame(rows)
