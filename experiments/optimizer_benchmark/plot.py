"""Figures of the optimiser benchmark: training loss over steps and over time."""

from __future__ import annotations

import matplotlib

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def figure(curves: pd.DataFrame) -> Figure:
    """Median training loss of each tuned optimiser per problem, by step and time.

    Args:
        curves: Evaluation rows of the final runs (``problem, optimizer, seed,
            step, time_s, train_loss``).

    Returns:
        A figure with two rows (per step, per second) and one column per problem.
    """
    problems = list(dict.fromkeys(curves["problem"]))
    fig, axes = plt.subplots(2, len(problems), figsize=(4.2 * len(problems), 7),
                             squeeze=False)  # fmt: skip
    colors = plt.get_cmap("tab20")
    names = list(dict.fromkeys(curves["optimizer"]))
    for col, problem in enumerate(problems):
        part = curves[curves["problem"] == problem]
        for i, name in enumerate(names):
            runs = part[part["optimizer"] == name]
            if runs.empty:
                continue
            median = runs.groupby("step").agg(
                train_loss=("train_loss", "median"), time_s=("time_s", "median")
            )
            style = {"color": colors(i % 20), "label": name, "lw": 1.2}
            if name.startswith("newton_default"):
                style.update(lw=2.4)
            axes[0, col].plot(median.index, median["train_loss"], **style)
            axes[1, col].plot(median["time_s"], median["train_loss"], **style)
        axes[0, col].set(title=problem, xlabel="step", ylabel="train loss",
                         yscale="log")  # fmt: skip
        axes[1, col].set(xlabel="seconds (timed steps)", ylabel="train loss",
                         yscale="log", xscale="log")  # fmt: skip
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
