"""Figure 1b/c of the ViViT paper: critical batch size per method and problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import plotting


def plot_critical(table: pd.DataFrame, out_dir: Path) -> Path:
    """Bar chart of ``N_crit``: one group of bars per problem, one bar per method."""
    problems = list(dict.fromkeys(table["problem"]))
    methods = list(dict.fromkeys(table["method"]))
    fig, axes = plotting.subplots(
        1, 1, width=max(5.0, 1.2 + 1.3 * len(problems) * len(methods) / 3)
    )
    ax = axes[0, 0]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("problem")
        values = [rows["n_crit"].get(p, np.nan) for p in problems]
        capped = [bool(rows["capped"].get(p, False)) for p in problems]
        positions = np.arange(len(problems)) + i * width
        bars = ax.bar(positions, values, width, label=method,
                      hatch=["//" if c else "" for c in capped])  # fmt: skip
        ax.bar_label(bars, labels=_labels(values, capped), fontsize=7)
    ax.set_xticks(np.arange(len(problems)) + 0.4 - width / 2, problems)
    ax.set_ylabel("critical batch size N_crit")
    ax.set_yscale("log")
    budget = table["budget_gb"].iloc[0]
    device = table["device"].iloc[0]
    ax.set_title(
        f"largest batch within {budget:g} GB ({device})\n"
        "≥ / hatched: still fits at the search cap",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return plotting.save(fig, Path(out_dir) / "critical_batch_size.png")


def _labels(values: list, capped: list[bool]) -> list[str]:
    """Bar labels: the value, with "≥" where the search stopped at its cap."""
    return [
        "failed" if pd.isna(v) else f"{'≥' if c else ''}{int(v)}"
        for v, c in zip(values, capped, strict=True)
    ]
