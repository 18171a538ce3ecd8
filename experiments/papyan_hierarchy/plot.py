"""Papyan-style figures: GGN spectrum, its parts, G minus each part, class means."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting

STYLE = {
    "A1": ("tab:orange", "A1 class means"),
    "A2": ("tab:cyan", "A2 own-class means"),
    "B1": ("tab:green", "B1 cross-class"),
    "B2": ("tab:red", "B2 within-class"),
}


def plot_batch_hierarchy(
    table: pd.DataFrame, summary: pd.DataFrame, out_dir: Path
) -> list[Path]:
    """One figure per problem, one column per checkpoint (held-out batch).

    Rows: (1) log-eigenvalue histograms of ``G`` and its parts; (2) the top
    eigenvalues of ``G`` and of ``G`` minus each part against their index, with the
    bulk edge ``λ_{m+1}(G)`` dashed; (3) ``G`` on the training vs the held-out batch.
    """
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        fig, axes = plotting.subplots(3, len(steps), width=4.0, height=3.0)
        for col, step in enumerate(steps):
            rows = frame[frame["step"] == step]
            test = rows[rows["split"] == "test"]
            _parts(axes[0, col], test)
            axes[0, col].set_title(f"{problem}, step {step}: parts", fontsize=9)
            _minus(axes[1, col], test)
            stats = summary[
                (summary["problem"] == problem)
                & (summary["step"] == step)
                & (summary["split"] == "test")
                & (summary["matrix"] == "G")
            ]
            if len(stats):
                axes[1, col].axhline(
                    stats["lambda_after"].iloc[0], color="k", ls="--", lw=0.8
                )
            axes[1, col].set_title("G minus each part (-- bulk edge)", fontsize=9)
            _train_test(axes[2, col], rows)
            axes[2, col].set_title("G: train vs held-out batch", fontsize=9)
        paths.append(
            plotting.save(fig, Path(out_dir) / f"hierarchy_batch_{problem}.png")
        )
    return paths


def _parts(ax, rows: pd.DataFrame) -> None:
    bins = plotting.log_bins(rows["eigenvalue"].to_numpy(), num=50, floor=0)
    ggn = rows.loc[rows["matrix"] == "G", "eigenvalue"].to_numpy()
    ax.hist(
        ggn, bins=bins, histtype="stepfilled", color="grey", label=f"G ({len(ggn)})"
    )
    for name, (color, label) in STYLE.items():
        values = rows.loc[rows["matrix"] == name, "eigenvalue"].to_numpy()
        ax.hist(values, bins=bins, histtype="step", color=color, lw=1.4,
                label=f"{label} ({len(values)})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.legend(fontsize=6)


def _minus(ax, rows: pd.DataFrame, count: int = 40) -> None:
    classes = int(rows["num_classes"].iloc[0])
    for name, color, style in [("G", "grey", "o-")] + [
        (f"G-{part}", color, ".-") for part, (color, _) in STYLE.items()
    ]:
        values = rows.loc[rows["matrix"] == name, "eigenvalue"].to_numpy()[:count]
        ax.semilogy(np.arange(1, len(values) + 1), values, style, color=color,
                    ms=3, lw=0.8, label=name)  # fmt: skip
    ax.axvline(classes + 0.5, color="k", lw=0.5, ls=":")
    ax.set_xlabel(f"index k (: after C'={classes})")
    ax.set_ylabel("λ_k")
    ax.legend(fontsize=6)


def _train_test(ax, rows: pd.DataFrame) -> None:
    ggn = rows[rows["matrix"] == "G"]
    bins = plotting.log_bins(ggn["eigenvalue"].to_numpy(), num=50, floor=0)
    for split, color in (("train", "tab:blue"), ("test", "tab:red")):
        values = ggn.loc[ggn["split"] == split, "eigenvalue"].to_numpy()
        ax.hist(values, bins=bins, histtype="step", color=color, lw=1.2,
                label=f"{split} (λ_1={values.max():.3g})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.legend(fontsize=6)


def plot_class_means(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Cosine Gram matrix of the class means, per checkpoint (held-out batch)."""
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        fig, axes = plotting.subplots(1, len(steps), width=3.4, height=3.0)
        for ax, step in zip(axes[0], steps, strict=True):
            rows = frame[(frame["step"] == step) & (frame["split"] == "test")]
            grid = rows.pivot_table(index="row", columns="col", values="cosine")
            image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=6)
            ax.set_yticks(range(len(grid.index)), grid.index, fontsize=6)
            ax.set_title(f"{problem}, step {step}: cos(g_c, g_c')", fontsize=9)
        fig.colorbar(image, ax=axes[0, -1])
        paths.append(plotting.save(fig, Path(out_dir) / f"class_means_{problem}.png"))
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
        axes[0, 0].set_ylabel("density (kernel: Ritz spacing)")
        paths.append(
            plotting.save(fig, Path(out_dir) / f"hierarchy_full_{problem}.png")
        )
    return paths
