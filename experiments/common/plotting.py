"""Plotting helpers: headless (agg) figures, consistent style, atomic PNG output."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common.files import (  # noqa: E402
    ResultsNotWritableError,
    atomic_write_bytes,
)

#: ``(column, label, y scale)`` of the loss and accuracy panels of the training curves.
CURVE_PANELS = [
    ("train_loss", "train loss", "log"),
    ("test_loss", "test loss", "log"),
    ("train_accuracy", "train accuracy", "linear"),
    ("test_accuracy", "test accuracy", "linear"),
]


def label_curve_panel(ax, xlabel: str, ylabel: str, scale: str) -> None:
    """Label a panel of :data:`CURVE_PANELS` (losses: log axis up to 10; else 0-1)."""
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale=scale)
    if scale == "log":
        ax.set_ylim(top=10.0)
    else:
        ax.set_ylim(0.0, 1.02)


def subplots(nrows: int, ncols: int, width: float = 3.2, height: float = 2.6, **kwargs):
    """Create a grid of axes, ``width`` x ``height`` inches each, 2-D indexable."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs
    )
    return fig, axes


def save(fig, path: Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG (creating folders, atomically) and close it.

    Identical bytes are not written again. If the folder is read-only and an older
    figure exists, a warning says it was not updated.
    """
    path = Path(path)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except ResultsNotWritableError as err:
        if not path.is_file():
            raise
        warnings.warn(f"{path} was not updated: {err}", UserWarning, stacklevel=2)
    return path


def log_bins(values: np.ndarray, num: int = 40, floor: float = 1e-12) -> np.ndarray:
    """Log-spaced histogram bins covering the positive ``values``."""
    positive = np.asarray(values)[np.asarray(values) > floor]
    if positive.size == 0:
        return np.logspace(-6, 0, num)
    low, high = positive.min(), positive.max()
    if high <= low:
        high = low * 10
    return np.logspace(np.log10(low) - 0.05, np.log10(high) + 0.05, num)


def step_colors(steps: list[int]) -> dict[int, tuple]:
    """One colour per checkpoint step, light (early) to dark (late)."""
    cmap = plt.get_cmap("viridis")
    count = max(len(steps) - 1, 1)
    return {step: cmap(i / count) for i, step in enumerate(sorted(steps))}
