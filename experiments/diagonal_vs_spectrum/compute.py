"""GGN diagonal (BackPACK, MC and exact) vs its exact and its Lanczos spectrum.

Diagonal approximations (as used by Adam-like and diagonal second-order methods)
are often read as if they were the spectrum. On one batch: the diagonal from
BackPACK's ``DiagGGNMC`` (one MC sample) and ``DiagGGNExact``, the exact nonzero
spectrum from vivitlib's Gram matrix (the other ``D - K`` eigenvalues are zero),
and the stochastic-Lanczos-quadrature density of the same GGN from
:mod:`vivitlib.hessianfree` (Granziol et al., *Deep Curvature Suite*). Both have the
same trace, but by Schur-Horn the diagonal is majorised by the eigenvalues: its
largest entry underestimates the top eigenvalue and it hides the flat directions.
The MC diagonal is random: it is drawn ``num_draws`` times (seeds ``seed + draw``)
and summarised by its median and spread. Passes run in float64.

Columns of the table (``diagonal_vs_spectrum.csv``): ``kind`` (``diag_mc``,
``diag_exact``, ``spectrum_exact``, ``lanczos_density``), ``draw`` (MC draw; 0
otherwise), ``value`` (entry, eigenvalue or grid point), ``weight`` (1 per entry,
the density for ``lanczos_density``), ``dim`` (``D``).

Columns of :func:`summarize` (``diagonal_vs_spectrum_summary.csv``, one row per
checkpoint and kind): for ``Q`` in ``trace``, ``largest``, ``num_above_1e-3_max``
(entries above ``1e-3 ×`` the largest exact eigenvalue: a stated threshold):
``Q_median``, ``Q_q10``, ``Q_q90``, ``Q_min``, ``Q_max`` over the draws (one draw
for the exact kinds), plus ``count`` (entries per draw) and ``num_draws``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from experiments.common.curvature import eigenvalues, in_precision, low_rank_ggn
from experiments.common.spread import spread_columns


def diagonals(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    num_draws: int = 10,
    seed: int = 0,
) -> list[tuple[str, int, np.ndarray]]:
    """Return ``(kind, draw, diagonal [D])``: ``DiagGGNExact`` and MC draws."""
    from backpack import backpack
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    params = list(model.parameters())

    def diagonal(extension, field: str) -> np.ndarray:
        model.zero_grad()
        with backpack(extension):
            loss_fn(model(inputs), labels).backward()
        flat = torch.cat([getattr(p, field).flatten() for p in params])
        return flat.detach().to(torch.float64).cpu().numpy()

    result = [("diag_exact", 0, diagonal(DiagGGNExact(), "diag_ggn_exact"))]
    for draw in range(num_draws):
        torch.manual_seed(seed + draw)
        result.append(("diag_mc", draw, diagonal(DiagGGNMC(1), "diag_ggn_mc")))
    return result


def lanczos_density(
    plain: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    num_iters: int,
    num_probes: int,
    seed: int,
) -> pd.DataFrame:
    """Return the SLQ density of the batch GGN as ``value`` (grid) and ``weight``."""
    from vivitlib import hessianfree as hf

    op = hf.GGNOperator(plain, loss_fn, [(inputs, labels)])
    density = hf.spectral_density(
        op,
        num_iters,
        num_probes,
        kernel_var=1e-4,
        generator=torch.Generator().manual_seed(seed),
    )
    return pd.DataFrame(
        {
            "kind": "lanczos_density",
            "value": density.grid.double().cpu().numpy(),
            "weight": density.density.double().cpu().numpy(),
        }
    )


def diagonal_table(
    model,
    loss_fn,
    plain,
    inputs,
    labels,
    *,
    num_iters: int = 40,
    num_probes: int = 5,
    seed: int = 0,
    num_draws: int = 10,
) -> pd.DataFrame:
    """Collect diagonal entries, exact eigenvalues and the Lanczos density.

    Args:
        model: BackPACK-extended model (eval mode).
        loss_fn: BackPACK-extended loss.
        plain: The same model without BackPACK hooks, for matrix-free products;
            ``None`` skips the Lanczos density.
        inputs: Batch inputs ``[N, ...]``.
        labels: Batch labels ``[N]``.
        num_iters: Lanczos steps per probe. Default: ``40``.
        num_probes: SLQ probes. Default: ``5``.
        seed: Seed of the probes and the MC draws. Default: ``0``.
        num_draws: MC diagonal draws. Default: ``10``.

    Returns:
        The table whose columns the module docstring lists.

    """
    model, inputs = in_precision(model, inputs, "float64")
    frames = [
        pd.DataFrame({"kind": kind, "draw": draw, "value": values, "weight": 1.0})
        for kind, draw, values in diagonals(
            model, loss_fn, inputs, labels, num_draws, seed
        )
    ]
    ggn = low_rank_ggn(model, loss_fn, inputs, labels, compute=("eigenvalues",))
    frames.append(
        pd.DataFrame(
            {
                "kind": "spectrum_exact",
                "value": eigenvalues(ggn.blocks[0]),
                "weight": 1.0,
            }
        )
    )
    if plain is not None:
        plain = plain.to(torch.float64)
        frames.append(
            lanczos_density(plain, loss_fn, inputs, labels, num_iters, num_probes, seed)
        )
    table = pd.concat(frames, ignore_index=True)
    table["draw"] = table["draw"].fillna(0).astype(int)
    table["dim"] = sum(p.numel() for p in model.parameters())
    return table


def summarize(table: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Per batch and kind: trace, largest value, entries above 1e-3·λ_max (spread).

    Args:
        table: Concatenated :func:`diagonal_table` outputs.
        group: Columns identifying one batch (e.g. problem, step).

    Returns:
        One row per (batch, kind); columns in the module docstring.

    """
    exact = table[table["kind"] != "lanczos_density"]
    rows = []
    for key, frame in exact.groupby(group):
        labels = dict(
            zip(group, key if isinstance(key, tuple) else (key,), strict=True)
        )
        top = frame.loc[frame["kind"] == "spectrum_exact", "value"].max()
        for kind, part in frame.groupby("kind"):
            grouped = part.assign(big=part["value"] > 1e-3 * top).groupby("draw")
            per_draw = grouped["value"].agg(trace="sum", largest="max", count="count")
            per_draw["num_above_1e-3_max"] = grouped["big"].sum()
            row = {**labels, "kind": kind, "count": int(per_draw["count"].iloc[0])}
            for column in ("trace", "largest", "num_above_1e-3_max"):
                row.update(spread_columns(column, per_draw[column]))
            row["num_draws"] = len(per_draw)
            rows.append(row)
    return pd.DataFrame(rows)
