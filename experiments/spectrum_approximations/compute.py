"""Exact, curvature-sub-sampled and Monte-Carlo GGN spectra on one mini-batch.

Three ways of building ``V`` at different cost (Dangel et al., 2022, *ViViT*,
Section 2.4): the exact factor on all ``N`` samples (``N·C`` columns), the exact
factor on a random fraction of the samples (``N·C/8`` columns, rescaled to the
fraction's size) and one Monte-Carlo sample per data point (``N`` columns). Both
approximations are random: each is drawn ``num_draws`` times (new subset, new MC
sample) and reported with its median and spread over the draws. Passes run in
float64.

Columns of the eigenvalue table (``spectrum_approximations.csv``): ``method``
(``exact``, ``subsampled_1/8``, ``mc_1``), ``draw`` (0 for ``exact``), ``k``,
``eigenvalue``, ``num_columns`` (columns of ``V``).

Columns of :func:`distances` (``spectrum_approximations_draws.csv``, one row per
draw): ``wasserstein_log10`` (1-Wasserstein distance between the distributions of
``log10 λ`` of the approximate and the exact spectrum, both restricted to
``λ > 1e-4 · λ_max(exact)`` so that round-off does not count), ``num_above``
(eigenvalues above that threshold), ``top_ratio`` (λ_max ratio to exact),
``trace_ratio`` (trace ratio to exact).

Columns of :func:`spread` (``spectrum_approximations_distances.csv``, one row per
method and checkpoint): for each of those quantities ``Q``: ``Q_median``,
``Q_q10``, ``Q_q90`` (10 % and 90 % quantiles over the draws), ``Q_min``,
``Q_max``, and ``num_draws``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import wasserstein_distance
from torch import Tensor, nn

from experiments.common.curvature import eigenvalues, in_precision, low_rank_ggn
from experiments.common.spread import spread_columns

#: Eigenvalues below this fraction of the exact λ_max are left out of distances.
FLOOR = 1e-4
QUANTITIES = ("wasserstein_log10", "num_above", "top_ratio", "trace_ratio")


def approximation_settings(
    batch_size: int, fraction: int = 8, num_draws: int = 10, seed: int = 0
) -> list[tuple[str, int, dict]]:
    """Return ``(method, draw, LowRankGGN keyword arguments)`` of every pass.

    Sub-sampling draws a random subset of ``batch_size // fraction`` samples per
    draw; the MC draws are seeded by ``torch.manual_seed(seed + draw)``.
    """
    keep = max(1, batch_size // fraction)
    generator = torch.Generator().manual_seed(seed)
    settings = [("exact", 0, {})]
    for draw in range(num_draws):
        subset = torch.randperm(batch_size, generator=generator)[:keep]
        settings.append(
            (f"subsampled_1/{fraction}", draw, {"subsampling": sorted(subset.tolist())})
        )
    settings += [("mc_1", draw, {"mc_samples": 1}) for draw in range(num_draws)]
    return settings


def spectra_table(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    fraction: int = 8,
    num_draws: int = 10,
    seed: int = 0,
) -> pd.DataFrame:
    """Compute the GGN spectrum of each approximation and draw on one batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode); cast to float64
            in place.
        loss_fn: BackPACK-extended loss.
        inputs: Inputs ``[N, ...]``.
        labels: Labels ``[N]``.
        fraction: Curvature sub-sampling keeps ``N // fraction`` samples.
            Default: ``8``.
        num_draws: Draws of each random approximation. Default: ``10``.
        seed: Seed of the subsets and MC samples. Default: ``0``.

    Returns:
        The eigenvalue table (columns in the module docstring).

    """
    model, inputs = in_precision(model, inputs, "float64")
    frames = []
    with torch.no_grad():
        num_outputs = model(inputs[:1]).shape[1]
    for method, draw, kwargs in approximation_settings(
        len(labels), fraction, num_draws, seed
    ):
        torch.manual_seed(seed + draw)
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
                    "draw": draw,
                    "k": np.arange(len(evals)),
                    "eigenvalue": evals,
                    "num_columns": columns,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def distances(table: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Compare each draw of each approximate spectrum with the exact one.

    Args:
        table: Concatenated :func:`spectra_table` outputs.
        group: Columns that identify one batch (e.g. problem, step).

    Returns:
        One row per (batch, method, draw); columns in the module docstring.

    """
    rows = []
    for key, frame in table.groupby(group):
        exact = frame.loc[frame["method"] == "exact", "eigenvalue"].to_numpy()
        floor = FLOOR * exact.max()
        for (method, draw), approx in frame.groupby(["method", "draw"], sort=False):
            values = approx["eigenvalue"].to_numpy()
            above = values[values > floor]
            rows.append(
                {
                    **dict(zip(group, key, strict=True)),
                    "method": method,
                    "draw": draw,
                    "wasserstein_log10": wasserstein_distance(
                        np.log10(exact[exact > floor]),
                        np.log10(above if len(above) else [floor]),
                    ),
                    "num_above": len(above),
                    "top_ratio": values.max() / exact.max(),
                    "trace_ratio": values.sum() / exact.sum(),
                }
            )
    return pd.DataFrame(rows)


def spread(draws: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Median, 10/90 % quantiles, minimum and maximum over the draws.

    Args:
        draws: Output of :func:`distances`.
        group: Columns identifying one batch.

    Returns:
        One row per (batch, method); columns in the module docstring.

    """
    rows = []
    for key, frame in draws.groupby([*group, "method"], sort=False):
        row = {**dict(zip([*group, "method"], key, strict=True))}
        for column in QUANTITIES:
            row.update(spread_columns(column, frame[column]))
        row["num_draws"] = len(frame)
        rows.append(row)
    return pd.DataFrame(rows)
