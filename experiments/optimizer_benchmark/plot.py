"""Figures of the optimiser benchmark: training loss over steps and over time."""

from __future__ import annotations

import matplotlib

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def figure(curves: pd.DataFrame) -> Figure:
    """Median training loss of each tuned optimiser per problem, by step and time.

    The per-second panels start at the first evaluation after step 0; losses
    above ten times the initial one (divergence) are cut off.

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
            timed = median[median["time_s"] > 0]  # log axis: no step-0 point
            axes[1, col].plot(timed["time_s"], timed["train_loss"], **style)
        top = 10 * part.loc[part["step"] == 0, "train_loss"].median()  # clip blow-ups
        axes[0, col].set(title=problem, xlabel="step", ylabel="train loss",
                         yscale="log", ylim=(None, top))  # fmt: skip
        axes[1, col].set(xlabel="seconds (timed steps)", ylabel="train loss",
                         yscale="log", xscale="log", ylim=(None, top))  # fmt: skip
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
