"""1-D and 2-D loss-landscape slices: top GGN eigenvectors vs random directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting


def plot_landscape(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One figure per problem: per checkpoint a 1-D slice and two 2-D contour plots."""
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        fig, axes = plotting.subplots(len(steps), 3, width=3.6, height=3.0)
        for row, step in enumerate(steps):
            rows = frame[frame["step"] == step]
            _slice(axes[row, 0], rows)
            for col, plane in ((1, "top"), (2, "random")):
                _contour(
                    axes[row, col],
                    rows[(rows["plane"] == plane) & (rows["split"] == "train")],
                )
                axes[row, col].set_title(
                    f"step {step}: {plane} plane (train)", fontsize=9
                )
            axes[row, 0].set_title(f"step {step}: 1-D slices", fontsize=9)
        paths.append(plotting.save(fig, Path(out_dir) / f"landscape_{problem}.png"))
    return paths


def _slice(ax, rows: pd.DataFrame) -> None:
    line = rows[rows["beta"] == 0]
    for (plane, split), part in line.groupby(["plane", "split"]):
        style = "-" if plane == "top" else ":"
        ax.plot(part["alpha"], part["loss"], style, label=f"{plane} d1, {split}")
    top = line[(line["plane"] == "top") & (line["split"] == "train")]
    if len(top):
        alpha = np.sort(top["alpha"].unique())
        base = top.loc[top["alpha"].abs().idxmin(), "loss"]
        lam, gam = top["lambda_1"].iloc[0], top["gamma_1"].iloc[0]
        ax.plot(
            alpha,
            base + gam * alpha + 0.5 * lam * alpha**2,
            "k--",
            lw=0.8,
            label="quadratic model (e_1)",
        )
    ax.set_xlabel("α")
    ax.set_ylabel("loss")
    ax.legend(fontsize=6)


def _contour(ax, rows: pd.DataFrame) -> None:
    grid = rows.pivot_table(index="beta", columns="alpha", values="loss")
    levels = np.quantile(grid.to_numpy(), np.linspace(0, 1, 15))
    contour = ax.contourf(
        grid.columns,
        grid.index,
        grid.to_numpy(),
        levels=np.unique(levels),
        cmap="viridis",
    )
    ax.figure.colorbar(contour, ax=ax)
    ax.set_xlabel("α (d1)")
    ax.set_ylabel("β (d2)")
