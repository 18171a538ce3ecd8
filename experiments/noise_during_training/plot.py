"""Figure 2 of the ViViT paper from the noise-during-training table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting
from experiments.common.spectrum import THRESHOLDS, spectrum_summary, tag

ROWS = ("|γ_k| vs λ_k", "gradient overlap", "SNR(λ_k)", "SNR(γ_k)")
#: The threshold (fraction of λ_max) named in the titles.
TITLE_THRESHOLD = THRESHOLDS[1]


def plot_noise(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Plot one figure per (problem, optimizer): rows (a)-(d), columns = checkpoints.

    Dotted vertical lines mark the fixed fractions of ``λ_max`` of
    :data:`~experiments.common.spectrum.THRESHOLDS`; titles give the
    count above ``1e-4 · λ_max`` and annotations the shares at every threshold.

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
        fig.suptitle(
            f"{problem}, {optimizer}: gradient, curvature and noise "
            f"(dotted: {', '.join(f'{f:g}' for f in THRESHOLDS)} · λ_max)"
        )
        path = Path(out_dir) / f"noise_{problem}_{optimizer}.png"
        paths.append(plotting.save(fig, path))
    return paths


def _column(axes, rows: pd.DataFrame) -> None:
    evals = rows["eigenvalue"].to_numpy()
    summary = spectrum_summary(rows)
    step, epoch = rows["step"].iloc[0], rows["epoch"].iloc[0]
    count = summary[f"num_above_{tag(TITLE_THRESHOLD)}"]
    axes[0].set_title(
        f"step {step} (epoch {epoch:g})\nK(λ>{TITLE_THRESHOLD:g}·λ_max)={count}",
        fontsize=9,
    )
    axes[0].loglog(evals, rows["abs_gamma"].clip(lower=1e-12), ".", ms=3)
    axes[0].set_ylabel("|γ_k|")
    bins = plotting.log_bins(evals, num=25, floor=0)
    axes[1].hist(evals, bins=bins, weights=rows["overlap"], color="tab:green")
    axes[1].set_xscale("log")
    axes[1].set_ylabel("Σ γ_k²/‖g‖² per bin")
    flat = ", ".join(
        f"{max(0.0, 1 - summary[f'overlap_above_{tag(f)}']):.2g}" for f in THRESHOLDS
    )
    axes[1].text(
        0.03, 0.88, f"below thresholds: {flat}", transform=axes[1].transAxes, fontsize=7
    )
    for ax, column, label in [
        (axes[2], "lambda_snr", "SNR(λ_k)"),
        (axes[3], "gamma_snr", "SNR(γ_k)"),
    ]:
        snr = np.clip(rows[column].to_numpy(), 1e-8, None)
        ax.loglog(evals, snr, ".", ms=3)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_ylabel(label)
        shares = ", ".join(
            f"{summary[f'{column}_gt1_share_{tag(f)}']:.0%}" for f in THRESHOLDS
        )
        ax.text(0.03, 0.88, f"SNR>1: {shares}", transform=ax.transAxes, fontsize=7)
    for ax in axes:
        for fraction in THRESHOLDS:
            ax.axvline(fraction * evals.max(), color="grey", lw=0.6, ls=":")
    axes[3].set_xlabel("λ_k")
