"""Figure 1a of the ViViT paper: approximate spectra over many draws, with bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting
from experiments.spectrum_approximations.compute import FLOOR


def plot_spectra(
    table: pd.DataFrame, summary: pd.DataFrame, out_dir: Path
) -> list[Path]:
    """One figure per problem: rows = checkpoints, columns = approximations + ratios.

    Each approximation panel shows the exact spectrum (grey) and, per log-spaced
    bin, the median count over the draws (line) with the 10-90 % band; the last
    column shows the λ_max and trace ratios to exact (median, 10-90 % bar, min-max
    dots).

    Args:
        table: The eigenvalue table (``method``, ``draw``, ``eigenvalue``, ...).
        summary: The spread table from :func:`..compute.spread`.
        out_dir: Folder for the PNG files.

    Returns:
        The paths of the figures.

    """
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        methods = [m for m in dict.fromkeys(frame["method"]) if m != "exact"]
        fig, axes = plotting.subplots(len(steps), len(methods) + 1, width=3.6)
        for row, step in enumerate(steps):
            at_step = frame[frame["step"] == step]
            exact = at_step.loc[at_step["method"] == "exact", "eigenvalue"].to_numpy()
            floor = FLOOR * exact.max()
            values = at_step["eigenvalue"].to_numpy()
            bins = plotting.log_bins(values[values > floor * 1e-2], num=40, floor=0)
            stats = summary[(summary["problem"] == problem) & (summary["step"] == step)]
            for col, method in enumerate(methods):
                ax = axes[row, col]
                _bands(ax, at_step[at_step["method"] == method], exact, bins)
                ax.axvline(floor, color="k", lw=0.6, ls=":")
                line = stats[stats["method"] == method].iloc[0]
                ax.set_title(
                    f"{method}, step {step} ({int(line['num_draws'])} draws)\n"
                    f"trace ratio {line['trace_ratio_median']:.2f} "
                    f"[{line['trace_ratio_min']:.2f}, {line['trace_ratio_max']:.2f}]",
                    fontsize=8,
                )
            _ratios(axes[row, -1], stats[stats["method"].isin(methods)])
            axes[row, -1].set_title(f"step {step}: ratio to exact", fontsize=8)
            axes[row, 0].set_ylabel("count per bin")
        paths.append(plotting.save(fig, Path(out_dir) / f"spectra_{problem}.png"))
    return paths


def _bands(ax, rows: pd.DataFrame, exact: np.ndarray, bins: np.ndarray) -> None:
    counts = np.stack(
        [
            np.histogram(draw["eigenvalue"], bins=bins)[0]
            for _, draw in rows.groupby("draw")
        ]
    )
    ax.stairs(np.histogram(exact, bins=bins)[0], bins, fill=True, color="lightgrey",
              label="exact")  # fmt: skip
    low, mid, high = np.quantile(counts, [0.1, 0.5, 0.9], axis=0)
    ax.stairs(high, bins, baseline=low, fill=True, color="tab:blue", alpha=0.3,
              label="10-90 % of draws")  # fmt: skip
    ax.stairs(mid, bins, color="tab:blue", label="median")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("eigenvalue (: 1e-4·λ_max)")
    ax.legend(fontsize=6)


def _ratios(ax, stats: pd.DataFrame) -> None:
    for i, (_, line) in enumerate(stats.iterrows()):
        for j, (name, marker) in enumerate((("top_ratio", "o"), ("trace_ratio", "s"))):
            x = i + 0.2 * j
            median = line[f"{name}_median"]
            ax.errorbar(
                x,
                median,
                yerr=[[median - line[f"{name}_q10"]], [line[f"{name}_q90"] - median]],
                fmt=marker,
                color=f"C{j}",
                capsize=3,
                label=name.replace("_", " ") if i == 0 else None,
            )
            ax.plot([x, x], [line[f"{name}_min"], line[f"{name}_max"]], ".",
                    color=f"C{j}", ms=4)  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.set_xticks(range(len(stats)), stats["method"], fontsize=7)
    ax.set_yscale("log")
    ax.legend(fontsize=6)
