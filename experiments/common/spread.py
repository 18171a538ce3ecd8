"""Median, 10/90 % quantiles and extremes of a quantity over random draws."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def spread_columns(name: str, values: Iterable[float]) -> dict[str, float]:
    """``{name}_median``, ``_q10``, ``_q90``, ``_min``, ``_max`` of ``values``.

    Example:
        >>> spread_columns("trace", [1.0, 2.0, 3.0])["trace_median"]
        2.0
    """
    values = np.asarray(list(values), dtype=np.float64)
    return {
        f"{name}_median": float(np.median(values)),
        f"{name}_q10": float(np.quantile(values, 0.1)),
        f"{name}_q90": float(np.quantile(values, 0.9)),
        f"{name}_min": float(values.min()),
        f"{name}_max": float(values.max()),
    }
