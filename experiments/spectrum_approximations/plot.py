"""Figure 1a of the ViViT paper: spectra of the approximations side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting


def plot_spectra(
    table: pd.DataFrame, summary: pd.DataFrame, out_dir: Path
) -> list[Path]:
    """Plot one figure per problem: rows = checkpoints, columns = approximations.

    Args:
        table: The eigenvalue table (``method``, ``eigenvalue``, ``step``, ...).
        summary: The distances from :func:`..compute.distances`.
        out_dir: Folder for the PNG files.

    Returns:
        The paths of the figures.

    """
    paths = []
    for problem, frame in table.groupby("problem"):
        steps = sorted(frame["step"].unique())
        methods = list(dict.fromkeys(frame["method"]))
        fig, axes = plotting.subplots(
            len(steps), len(methods), sharex="row", sharey="row"
        )
        for row, step in enumerate(steps):
            at_step = frame[frame["step"] == step]
            bins = np.linspace(0, at_step["eigenvalue"].max() * 1.02, 60)
            for col, method in enumerate(methods):
                values = at_step.loc[at_step["method"] == method, "eigenvalue"]
                dist = summary[
                    (summary["problem"] == problem)
                    & (summary["step"] == step)
                    & (summary["method"] == method)
                ]
                ax = axes[row, col]
                ax.hist(values, bins=bins, log=True, color="tab:blue")
                title = f"{method}, step {step}\nK={len(values)}"
                if method != "exact" and len(dist):
                    title += f", W1(log λ)={dist['wasserstein_log10'].iloc[0]:.2f}"
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("eigenvalue")
            axes[row, 0].set_ylabel("count")
        paths.append(plotting.save(fig, Path(out_dir) / f"spectra_{problem}.png"))
    return paths
