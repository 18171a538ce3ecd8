"""Study 1's summary of its direction tables: one row per checkpoint, and its text.

The summary columns are those of :func:`experiments.common.spectrum.spectrum_summary`.
"""

from __future__ import annotations

import pandas as pd

from experiments.common.spectrum import THRESHOLDS, spectrum_summary, tag


def summarize(table: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Apply :func:`spectrum_summary` to every group of ``table``.

    Args:
        table: Concatenated direction tables.
        group: Columns identifying one batch (e.g. problem, optimizer, step).

    Returns:
        One row per group with the group columns and the summary columns.

    """
    rows = []
    for key, frame in table.groupby(group, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(group, key, strict=True)), **spectrum_summary(frame)})
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame, label: list[str]) -> str:
    """Format a summary as a few readable lines, one per checkpoint.

    Args:
        summary: Output of :func:`summarize`.
        label: Columns printed first to name each row.

    Returns:
        The text, one line per row.

    """
    middle = tag(THRESHOLDS[1])
    lines = [
        f"K = #eigenvalues > {THRESHOLDS[1]:g}·λ_max (the computed count depends on "
        "the round-off cut-off); SNR>1 share among those K directions"
    ]
    for _, row in summary.iterrows():
        name = ", ".join(f"{column} {row[column]}" for column in label)
        counts = "/".join(str(int(row[f"num_above_{tag(f)}"])) for f in THRESHOLDS)
        lines.append(
            f"{name}: K={int(row[f'num_above_{middle}'])} "
            f"(at {'/'.join(f'{f:g}' for f in THRESHOLDS)}·λ_max: {counts}), "
            f"λ_max={row['lambda_max']:.3g}, trace={row['trace']:.3g}, "
            f"SNR(λ)>1: {row[f'lambda_snr_gt1_share_{middle}']:.0%}, "
            f"SNR(γ)>1: {row[f'gamma_snr_gt1_share_{middle}']:.0%}, "
            f"‖g‖² share in top-10: {row['overlap_top10']:.0%}"
        )
    return "\n".join(lines)
