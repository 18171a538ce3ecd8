"""Histogram of the GGN diagonal against the exact spectrum and the Lanczos density."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting

COLORS = {
    "diag_mc": "tab:orange",
    "diag_exact": "tab:red",
    "spectrum_exact": "tab:blue",
}


def plot_diagonal(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One figure per problem; per checkpoint: log-scale histograms, then densities."""
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        fig, axes = plotting.subplots(len(steps), 2, width=4.2, height=3.0)
        for row, step in enumerate(steps):
            rows = frame[frame["step"] == step]
            _log_histograms(axes[row, 0], rows)
            _densities(axes[row, 1], rows)
            axes[row, 0].set_title(
                f"{problem}, step {step}: entries vs eigenvalues", fontsize=9
            )
            axes[row, 1].set_title("Lanczos density vs exact spectrum", fontsize=9)
        paths.append(plotting.save(fig, Path(out_dir) / f"diagonal_{problem}.png"))
    return paths


def _log_histograms(ax, rows: pd.DataFrame) -> None:
    exact = rows[rows["kind"] != "lanczos_density"]
    bins = plotting.log_bins(exact["value"].to_numpy(), num=50, floor=1e-14)
    for kind, color in COLORS.items():
        rows_kind = exact[exact["kind"] == kind]
        counts = np.stack(
            [
                np.histogram(draw["value"], bins=bins)[0]
                for _, draw in rows_kind.groupby("draw")
            ]
        )
        low, mid, high = np.quantile(counts, [0.1, 0.5, 0.9], axis=0)
        draws = len(counts)
        label = f"{kind} ({int((rows_kind['value'] > 0).sum() / draws)} > 0)"
        if draws > 1:
            ax.stairs(high, bins, baseline=low, fill=True, color=color, alpha=0.3)
            label += f", median and 10-90 % of {draws} draws"
        ax.stairs(mid, bins, color=color, lw=1.4, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("value")
    ax.legend(fontsize=6)


def _densities(ax, rows: pd.DataFrame) -> None:
    dim = rows["dim"].iloc[0]
    density = rows[rows["kind"] == "lanczos_density"]
    if len(density):
        ax.semilogy(
            density["value"],
            np.clip(density["weight"], 1e-8, None),
            color="tab:green",
            label="SLQ density (all D eigenvalues)",
        )
    evals = rows.loc[rows["kind"] == "spectrum_exact", "value"].to_numpy()
    diag = rows.loc[rows["kind"] == "diag_exact", "value"].to_numpy()
    high = max(evals.max(), diag.max())
    bins = np.linspace(min(0, diag.min()), high * 1.05, 60)
    width = bins[1] - bins[0]
    for values, kind, extra in (
        (evals, "spectrum_exact", dim - len(evals)),
        (diag, "diag_exact", 0),
    ):
        counts, _ = np.histogram(values, bins=bins)
        counts[0] += extra  # the zero eigenvalues
        ax.stairs(
            np.clip(counts / (dim * width), 1e-8, None),
            bins,
            color=COLORS[kind],
            label=kind,
        )
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue / diagonal entry")
    ax.legend(fontsize=6)
