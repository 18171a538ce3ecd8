"""Figure of the noisy-quadratic comparison from the CSV results.

Re-plot existing results without recomputing::

    python -m experiments.noisy_quadratic.plot --out results/noisy_quadratic
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from experiments.common.plotting import save  # noqa: E402
from experiments.common.tables import read_table  # noqa: E402
from experiments.problems.noisy_quadratic import NoisyQuadratic  # noqa: E402


def _loss_panel(ax, summary: pd.DataFrame, init_loss: float) -> None:
    colors = plt.get_cmap("tab10")
    for i, (name, frame) in enumerate(summary.groupby("optimizer", sort=False)):
        color = colors(i % 10)
        ax.plot(frame["step"], frame["loss_median"], color=color, label=name)
        ax.plot(frame["step"], frame["loss_mean"], color=color, ls="--", lw=0.8)
        ax.fill_between(
            frame["step"], frame["loss_q25"], frame["loss_q75"], color=color, alpha=0.2
        )
    ax.axhline(init_loss, color="black", lw=0.8)
    ax.set(yscale="log", xlabel="step", ylabel="loss (median, mean --, quartiles)")
    ax.legend(fontsize=6, ncol=2, loc="lower left")


def _distance_panel(ax, final: pd.DataFrame, init_distance: float) -> None:
    names = list(dict.fromkeys(final["optimizer"]))
    data = [final.loc[final["optimizer"] == n, "distance"].to_numpy() for n in names]
    ax.boxplot(data, whis=(0, 100))
    ax.set_xticks(range(1, len(names) + 1), names, rotation=60, fontsize=7)
    ax.axhline(init_distance, color="black", lw=0.8)
    ax.set(yscale="log", ylabel="final distance to minimum")


def _damping_panel(ax, example: pd.DataFrame, problem: NoisyQuadratic) -> None:
    cmap = plt.get_cmap("YlOrRd")
    curvatures = problem.curvatures
    for k in range(problem.dim):
        relative = example[f"damping_{k + 1}"].to_numpy() / curvatures[k]
        color = cmap(0.2 + 0.8 * k / max(problem.dim - 1, 1))
        ax.plot(example["step"], relative, color=color, marker=".", ms=3, lw=0.8)
    ax.set(yscale="log", xlabel="step", ylabel="relative damping δ_k / λ_k")
    ax.set_title("bootstrap, one run (darker: larger λ_k; gap: no step)", fontsize=8)


def figure(
    summary: pd.DataFrame,
    final: pd.DataFrame,
    example: pd.DataFrame,
    problem: NoisyQuadratic,
) -> Figure:
    """Three panels as in the paper's Figure 3.

    Args:
        summary: Per optimizer and step statistics (``summary.csv``).
        final: Final loss and distance per run (``final.csv``).
        example: One bootstrap run with ``damping_k`` columns.
        problem: The problem (for initial values and true curvatures).

    Returns:
        The figure.

    """
    init = np.full(problem.dim, problem.init)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    _loss_panel(axes[0], summary, problem.loss(init))
    _distance_panel(axes[1], final, float(np.linalg.norm(init)))
    _damping_panel(axes[2], example, problem)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot noisy-quadratic results.")
    parser.add_argument("--out", type=Path, default=Path("results/noisy_quadratic"))
    parser.add_argument("--damping-seed", type=int, default=0)
    args = parser.parse_args(argv)
    from experiments.noisy_quadratic import run  # noqa: PLC0415 (run imports plot)

    recorded = json.loads((args.out / "environment.json").read_text())["arguments"]
    options = argparse.Namespace(**{**vars(run.parse_args([])), **recorded})
    options.out = args.out
    problem = run.make_problem(options)
    summary = read_table(args.out / "summary.csv")
    final = read_table(args.out / "final.csv")
    example = run.run_table(options, problem, "bootstrap", args.damping_seed)
    save(figure(summary, final, example, problem), args.out / "noisy_quadratic.png")


if __name__ == "__main__":
    main()
