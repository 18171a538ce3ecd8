"""Papyan-style figure: the GGN spectrum and its class/cross-class parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting

STYLE = {
    "G": ("grey", "G"),
    "A1": ("tab:orange", "A1 class means"),
    "A2": ("tab:cyan", "A2 own-class means"),
    "B1": ("tab:green", "B1 cross-class"),
    "B2": ("tab:red", "B2 within-class"),
}


def plot_batch_hierarchy(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One figure per problem; one panel per checkpoint, log-eigenvalue histograms."""
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        fig, axes = plotting.subplots(1, len(steps), width=4.0, height=3.0)
        for ax, step in zip(axes[0], steps, strict=True):
            rows = frame[frame["step"] == step]
            bins = plotting.log_bins(rows["eigenvalue"].to_numpy(), num=50)
            for name, (color, label) in STYLE.items():
                values = rows.loc[rows["matrix"] == name, "eigenvalue"].to_numpy()
                kind = "stepfilled" if name == "G" else "step"
                ax.hist(
                    values,
                    bins=bins,
                    histtype=kind,
                    color=color,
                    alpha=0.9,
                    label=f"{label} ({len(values)})",
                    lw=1.4,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("eigenvalue")
            ax.set_title(f"{problem}, step {step}", fontsize=9)
            ax.legend(fontsize=6)
        axes[0, 0].set_ylabel("count")
        paths.append(
            plotting.save(fig, Path(out_dir) / f"hierarchy_batch_{problem}.png")
        )
    return paths


def plot_full_data(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Full-data Hessian, GGN and residual densities with their top eigenvalues."""
    paths = []
    colors = {"hessian": "tab:red", "ggn": "tab:green", "residual": "tab:blue"}
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        fig, axes = plotting.subplots(1, len(steps), width=4.0, height=3.0)
        for ax, step in zip(axes[0], steps, strict=True):
            rows = frame[frame["step"] == step]
            for name, color in colors.items():
                dens = rows[(rows["operator"] == name) & (rows["kind"] == "density")]
                ax.semilogy(
                    dens["x"],
                    np.clip(dens["y"], 1e-9, None),
                    color=color,
                    label=f"{name} (deflated)",
                    lw=1,
                )
                top = rows[(rows["operator"] == name) & (rows["kind"] == "top")]
                ax.plot(top["x"], np.full(len(top), 2e-6), "|", color=color, ms=12)
            ax.set_ylim(bottom=1e-6)
            ax.set_title(f"{problem}, step {step}: full data", fontsize=9)
            ax.set_xlabel("eigenvalue (| = top-C)")
            ax.legend(fontsize=6)
        axes[0, 0].set_ylabel("density")
        paths.append(
            plotting.save(fig, Path(out_dir) / f"hierarchy_full_{problem}.png")
        )
    return paths
