"""Figure of the Lanczos-Newton comparison from ``curves.csv`` and ``summary.csv``.

Re-plot without recomputing::

    python -m experiments.lanczos_newton.plot --out results/lanczos_newton
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.common.plotting import (
    CURVE_PANELS,
    label_curve_panel,
    save,
    subplots,
)


def _curves(ax, curves, x, column, colors, steps):
    for name, color in colors.items():
        frame = curves[curves["optimizer"] == name]
        if x == "step":
            frame = frame[frame["step"] <= steps]
        for index, (_, run) in enumerate(frame.groupby("seed")):
            values = run[column].replace([np.inf, -np.inf], np.nan)
            ax.plot(run[x], values, color=color, alpha=0.8, lw=1.2,
                    label=name if index == 0 else None)  # fmt: skip


def _bars(ax, summary, column, colors, ylabel):
    frame = summary[summary["regime"] == "matched_steps"].set_index("optimizer")
    values = frame[column].reindex(list(colors)).to_numpy(dtype=float)
    ax.bar(range(len(colors)), np.nan_to_num(values), color=list(colors.values()))
    ax.set_xticks(range(len(colors)), list(colors), rotation=30, fontsize=7)
    ax.set(ylabel=ylabel)


def figure(curves: pd.DataFrame, summary: pd.DataFrame, steps: int) -> Figure:
    """Curves against steps (row 1) and wall time (row 2); costs (row 3).

    Args:
        curves: All evaluations (``curves.csv``); one line per seed.
        summary: Matched-steps and matched-time table (``summary.csv``).
        steps: The step budget (x-range of row 1).

    Returns:
        The figure.
    """
    fig, axes = subplots(3, 4, width=3.4, height=2.7)
    names = list(dict.fromkeys(curves["optimizer"]))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    for col, (column, label, scale) in enumerate(CURVE_PANELS):
        for row, (x, xlabel) in enumerate(
            [("step", "step"), ("time_s", "training wall time [s]")]
        ):
            ax = axes[row, col]
            _curves(ax, curves, x, column, colors, steps)
            label_curve_panel(ax, xlabel, label, scale)
    axes[0, 0].legend(fontsize=7)
    _bars(axes[2, 0], summary, "time_per_step_ms", colors, "time per step [ms]")
    axes[2, 0].set_yscale("log")
    _bars(axes[2, 1], summary, "refresh_share", colors, "share of time in refreshes")
    _bars(axes[2, 2], summary, "products_per_refresh", colors, "products per refresh")
    for name, color in colors.items():
        frame = curves[curves["optimizer"] == name]
        if (frame["products"] > 0).any():
            stats = frame.groupby("step")["products"].mean()
            axes[2, 3].plot(stats.index, stats.to_numpy(), color=color, label=name)
    axes[2, 3].set(xlabel="step", ylabel="curvature products (cumulative)")
    axes[2, 3].legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Re-draw the figure from the CSV files in ``--out``."""
    parser = argparse.ArgumentParser(description="Plot the Lanczos-Newton comparison.")
    parser.add_argument("--out", type=Path, default=Path("results/lanczos_newton"))
    args = parser.parse_args(argv)
    curves = pd.read_csv(args.out / "curves.csv")
    summary = pd.read_csv(args.out / "summary.csv")
    steps = int(summary.loc[summary["regime"] == "matched_steps", "step"].max())
    save(figure(curves, summary, steps), args.out / "lanczos_newton.png")


if __name__ == "__main__":
    main()
