"""1-D and 2-D loss-landscape slices: top GGN eigenvectors vs random directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting


def plot_landscape(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One figure per problem: per checkpoint a 1-D slice and two 2-D contour plots.

    The two 2-D panels of a checkpoint share their contour levels and colour bar.
    """
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        fig, axes = plotting.subplots(len(steps), 3, width=3.6, height=3.0)
        for row, step in enumerate(steps):
            rows = frame[frame["step"] == step]
            _slice(axes[row, 0], rows)
            train = rows[rows["split"] == "train"]
            levels = shared_levels(train["loss"].to_numpy())
            for col, plane in ((1, "top"), (2, "random")):
                contour = _contour(
                    axes[row, col], train[train["plane"] == plane], levels
                )
                axes[row, col].set_title(
                    f"step {step}: {plane} plane (train)", fontsize=9
                )
            fig.colorbar(contour, ax=axes[row, 2], label="train loss (both planes)")
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


def shared_levels(losses: np.ndarray, count: int = 15) -> np.ndarray:
    """Contour levels shared by the planes of one checkpoint.

    Quantiles of the losses of both planes together, so that a colour means the
    same loss in the top and the random panel.
    """
    return np.unique(np.quantile(losses, np.linspace(0, 1, count)))


def _contour(ax, rows: pd.DataFrame, levels: np.ndarray):
    grid = rows.pivot_table(index="beta", columns="alpha", values="loss")
    contour = ax.contourf(
        grid.columns, grid.index, grid.to_numpy(), levels=levels, cmap="viridis",
        extend="both",
    )  # fmt: skip
    ax.set_xlabel("α (d1)")
    ax.set_ylabel("β (d2)")
    return contour
