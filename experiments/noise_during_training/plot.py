"""Figure 2 of the ViViT paper from the noise-during-training table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting

ROWS = ("|γ_k| vs λ_k", "gradient overlap", "SNR(λ_k)", "SNR(γ_k)")


def plot_noise(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Plot one figure per (problem, optimizer): rows (a)-(d), columns = checkpoints.

    Args:
        table: The study's combined table.
        out_dir: Folder for the PNG files.

    Returns:
        The paths of the figures.

    """
    paths = []
    for (problem, optimizer), run in table.groupby(["problem", "optimizer"]):
        steps = sorted(run["step"].unique())
        fig, axes = plotting.subplots(len(ROWS), len(steps), sharey="row")
        for col, step in enumerate(steps):
            rows = run[run["step"] == step]
            _column(axes[:, col], rows)
        fig.suptitle(f"{problem}, {optimizer}: gradient, curvature and noise")
        path = Path(out_dir) / f"noise_{problem}_{optimizer}.png"
        paths.append(plotting.save(fig, path))
    return paths


def _column(axes, rows: pd.DataFrame) -> None:
    evals = rows["eigenvalue"].to_numpy()
    step, epoch = rows["step"].iloc[0], rows["epoch"].iloc[0]
    axes[0].set_title(f"step {step} (epoch {epoch:g}), K={len(evals)}")
    axes[0].loglog(evals, rows["abs_gamma"].clip(lower=1e-12), ".", ms=3)
    axes[0].set_ylabel("|γ_k|")
    bins = plotting.log_bins(evals, num=25)
    axes[1].hist(evals, bins=bins, weights=rows["overlap"], color="tab:green")
    axes[1].set_xscale("log")
    flat = rows["flat_overlap"].iloc[0]
    axes[1].set_ylabel("Σ γ_k²/‖g‖² per bin")
    axes[1].text(0.03, 0.9, f"flat: {flat:.2g}", transform=axes[1].transAxes)
    for ax, column, label in [
        (axes[2], "lambda_snr", "SNR(λ_k)"),
        (axes[3], "gamma_snr", "SNR(γ_k)"),
    ]:
        snr = np.clip(rows[column].to_numpy(), 1e-8, None)
        ax.loglog(evals, snr, ".", ms=3)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_ylabel(label)
    axes[3].set_xlabel("λ_k")
