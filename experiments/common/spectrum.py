"""Spectrum summaries that do not depend on the eigenvalue cut-off (several studies).

The number ``K`` of "nontrivial" GGN eigenvalues is the count above a round-off
cut-off: it measures the threshold (and the floating-point precision), not the
network. The summaries here are either insensitive to the smallest eigenvalues
(``λ_max``, trace, effective ranks, gradient share in the top-``k`` directions for a
fixed ``k``) or are stated at fixed fractions ``f`` of ``λ_max`` (the count, the
share of directions with SNR > 1 and the gradient share above ``f · λ_max``), so
that their sensitivity to the threshold is visible.

Columns of :func:`spectrum_summary` (``f`` written as ``1e-02``, ...):

* ``lambda_max``: largest eigenvalue; ``trace``: sum of the eigenvalues.
* ``stable_rank``: ``trace / λ_max``; ``participation_rank``:
  ``trace² / Σ λ_k²`` (both dominated by the large eigenvalues).
* ``overlap_top{k}``: share ``Σ_{j<k} γ_j² / ‖g‖²`` of the squared gradient norm in
  the ``k`` leading directions (``k`` in :data:`TOP_K`).
* ``num_above_{f}``: number of eigenvalues ``> f · λ_max``.
* ``overlap_above_{f}``: share of ``‖g‖²`` in those directions; one minus it is
  the "flat" share at that threshold.
* ``lambda_snr_gt1_share_{f}`` / ``gamma_snr_gt1_share_{f}``: share of those
  directions whose curvature (``λ_nk``) or gradient (``γ_nk``) SNR exceeds 1.
* ``num_computed``: the number of eigenvalues the pass returned (above the
  library's round-off cut-off of the evaluation precision) — a threshold, not a
  property of the network.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Fixed fractions of ``λ_max`` at which counts and shares are reported.
THRESHOLDS = (1e-2, 1e-4, 1e-6)
#: Fixed numbers of leading directions for the gradient share.
TOP_K = (1, 10, 100)


def tag(fraction: float) -> str:
    """Column suffix of a threshold fraction, e.g. ``1e-04``."""
    return f"{fraction:.0e}"


def spectrum_summary(rows: pd.DataFrame) -> dict[str, float]:
    """Summarise one direction table (one batch, one checkpoint).

    Args:
        rows: Rows of :func:`experiments.common.curvature.direction_table`
            (``eigenvalue``, ``overlap``, ``lambda_snr``, ``gamma_snr``).

    Returns:
        The columns listed in the module docstring.

    """
    rows = rows.sort_values("eigenvalue", ascending=False)
    evals = rows["eigenvalue"].to_numpy(dtype=np.float64)
    overlap = rows["overlap"].to_numpy(dtype=np.float64)
    top, trace = float(evals[0]), float(evals.sum())
    summary = {
        "lambda_max": top,
        "trace": trace,
        "stable_rank": trace / top,
        "participation_rank": trace**2 / float(np.square(evals).sum()),
        "num_computed": len(evals),
    }
    for k in TOP_K:
        summary[f"overlap_top{k}"] = float(overlap[:k].sum())
    for fraction in THRESHOLDS:
        above = evals > fraction * top
        suffix = tag(fraction)
        summary[f"num_above_{suffix}"] = int(above.sum())
        summary[f"overlap_above_{suffix}"] = float(overlap[above].sum())
        for column in ("lambda_snr", "gamma_snr"):
            snr = rows[column].to_numpy(dtype=np.float64)[above]
            summary[f"{column}_gt1_share_{suffix}"] = float((snr > 1).mean())
    return summary
