"""GGN diagonal (BackPACK, MC and exact) vs its exact and its Lanczos spectrum.

Diagonal approximations (as used by Adam-like and diagonal second-order methods)
are often read as if they were the spectrum. On one batch: the diagonal from
BackPACK's ``DiagGGNMC`` (one MC sample) and ``DiagGGNExact``, the exact nonzero
spectrum from vivitlib's Gram matrix (the other ``D - K`` eigenvalues are zero),
and the stochastic-Lanczos-quadrature density of the same GGN from
:mod:`vivitlib.hessianfree` (Granziol et al., *Deep Curvature Suite*). Both have the
same trace, but by Schur-Horn the diagonal is majorised by the eigenvalues: its
largest entry underestimates the top eigenvalue and it hides the flat directions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from experiments.common.curvature import eigenvalues, low_rank_ggn


def diagonals(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, labels: Tensor
) -> dict[str, np.ndarray]:
    """Return the GGN diagonal ``[D]`` from ``DiagGGNMC`` and ``DiagGGNExact``."""
    from backpack import backpack
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    model.zero_grad()
    with backpack(DiagGGNMC(mc_samples=1), DiagGGNExact()):
        loss_fn(model(inputs), labels).backward()
    params = list(model.parameters())
    return {
        name: torch.cat([getattr(p, field).flatten() for p in params]).double().numpy()
        for name, field in (
            ("diag_mc", "diag_ggn_mc"),
            ("diag_exact", "diag_ggn_exact"),
        )
    }


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
        seed: Seed of the probes. Default: ``0``.

    Returns:
        Rows with ``kind`` (``diag_mc``, ``diag_exact``, ``spectrum_exact``,
        ``lanczos_density``), ``value`` and ``weight`` (1 per entry, the density
        for ``lanczos_density``), plus ``dim`` (``D``).

    """
    frames = [
        pd.DataFrame({"kind": kind, "value": values, "weight": 1.0})
        for kind, values in diagonals(model, loss_fn, inputs, labels).items()
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
        frames.append(
            lanczos_density(plain, loss_fn, inputs, labels, num_iters, num_probes, seed)
        )
    table = pd.concat(frames, ignore_index=True)
    table["dim"] = sum(p.numel() for p in model.parameters())
    return table


def summarize(table: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Per batch and kind: trace, largest value, and entries above 1e-3·max."""
    exact = table[table["kind"] != "lanczos_density"]
    stats = (
        exact.groupby([*group, "kind"])["value"]
        .agg(trace="sum", largest="max", count="count")
        .reset_index()
    )
    cut = exact.groupby(group)["value"].transform("max") * 1e-3
    above = exact.assign(big=exact["value"] > cut).groupby([*group, "kind"])["big"]
    stats["num_above_1e-3_max"] = above.sum().to_numpy()
    return stats
