"""Figure of the digits optimizer comparison from ``curves.csv``.

Re-plot without recomputing::

    python -m experiments.optimizers_digits.plot --out results/optimizers_digits
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


def figure(curves: pd.DataFrame) -> Figure:
    """Loss and accuracy curves (mean, min–max band over seeds) and time per step.

    Args:
        curves: All evaluations (``curves.csv``).

    Returns:
        The figure.
    """
    fig, axes = subplots(2, 3, width=4.0, height=3.0)
    names = list(dict.fromkeys(curves["optimizer"]))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    for (column, label, scale), ax in zip(CURVE_PANELS, axes[:, :2].T.flatten()):
        for name in names:
            frame = curves[curves["optimizer"] == name]
            stats = frame.groupby("step")[column].agg(["mean", "min", "max"])
            stats = stats.replace([np.inf, -np.inf], np.nan)
            color = colors[name]
            ax.plot(stats.index, stats["mean"], label=name, color=color)
            ax.fill_between(
                stats.index, stats["min"], stats["max"], alpha=0.2, color=color
            )
        label_curve_panel(ax, "step", label, scale)
    axes[0, 0].legend(fontsize=7)
    times = curves.groupby("optimizer", sort=False)["step_time_s"].mean() * 1e3
    axes[0, 2].bar(
        range(len(times)), times.to_numpy(), color=[colors[n] for n in times.index]
    )
    axes[0, 2].set_xticks(range(len(times)), times.index, rotation=45, fontsize=7)
    axes[0, 2].set(ylabel="wall time per step [ms]", yscale="log")
    for name in names:
        frame = curves[curves["optimizer"] == name]
        if frame["stepped_directions"].notna().any():
            stats = frame.groupby("step")[["stepped_directions", "directions"]].mean()
            axes[1, 2].plot(
                stats.index, stats["stepped_directions"], label=name, color=colors[name]
            )
    axes[1, 2].set(xlabel="step", ylabel="directions stepped along (mean)")
    axes[1, 2].legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot the digits comparison.")
    parser.add_argument("--out", type=Path, default=Path("results/optimizers_digits"))
    args = parser.parse_args(argv)
    curves = pd.read_csv(args.out / "curves.csv")
    save(figure(curves), args.out / "optimizers_digits.png")


if __name__ == "__main__":
    main()
