"""Evaluate Papyan's hierarchy on batches (exact, Gram contractions, float64).

Tables written by the study (``--out``):

* ``papyan_hierarchy.csv``, one row per eigenvalue: ``split`` (``train`` or
  ``test`` batch), ``matrix`` (``G``, the parts ``A1`` class means, ``A2``
  own-class means, ``B1`` cross-class, ``B2`` within-class, and ``G-A1`` ...
  ``G-B2``, the GGN without that part), ``k``, ``eigenvalue`` (nonzero: above
  ``1e-10 · λ_max(G)``), ``num_classes`` (``C'``, classes present in the batch).
* ``papyan_hierarchy_summary.csv`` (:func:`summarize`), one row per
  (split, step, matrix): ``rank``, ``trace``, ``top`` (λ_1), ``trace_share``
  (of ``G``'s trace; the parts' shares sum to one), ``num_outliers`` (``m``:
  ``C' − 1`` or ``C'``, whichever has the larger gap ``λ_m / λ_{m+1}`` in ``G``'s
  spectrum, see :func:`outlier_count`), ``lambda_last_outlier`` (the matrix's
  ``m``-th eigenvalue), ``lambda_after`` (its ``m+1``-th; for ``G`` the bulk
  edge), ``top_over_bulk_edge`` = λ_1(matrix) / λ_{m+1}(G) — for ``G-X`` a value
  near one means removing ``X`` removes the outliers.
* ``papyan_hierarchy_attribution.csv`` (:func:`attribution`), one row per
  (split, step): ``num_outliers``, ``outlier_gap`` = λ_m(G) / λ_{m+1}(G) (outliers
  exist when well above one), ``top_G``, ``bulk_edge_G``, and per part ``X``:
  ``top_without_X`` = λ_1(G − X),
  ``removed_share_X`` = (λ_1(G) − λ_1(G − X)) / (λ_1(G) − λ_{m+1}(G)), the share of
  the top eigenvalue's excess over the bulk edge that goes with ``X`` (one: the
  outliers vanish; zero: nothing changes), and ``removes_X``
  (``removed_share_X ≥ 0.8``).
* ``papyan_hierarchy_class_means.csv`` (:func:`class_mean_table`): the Gram
  matrix of the class means ``⟨g_c, g_c'⟩`` (``row``, ``col``, ``value``) and its
  cosine version (``cosine``), per split and step.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from experiments.common.curvature import in_precision, low_rank_ggn
from experiments.papyan_hierarchy.decomposition import (
    PARTS,
    class_mean_gram,
    part_spectra,
)

#: Removing ``X`` "removes the outliers" when it removes at least this share of
#: the excess ``λ_1(G) − λ_{m+1}(G)`` of the top eigenvalue over the bulk edge.
REMOVED = 0.8


def _gram_and_probs(model, loss_fn, inputs, labels):
    model, inputs = in_precision(model, inputs, "float64")
    ggn = low_rank_ggn(model, loss_fn, inputs, labels, compute=("eigenvalues",))
    with torch.no_grad():
        probs = model(inputs).softmax(dim=1)
    return ggn.blocks[0].gram, probs


def batch_hierarchy_table(
    model: nn.Module, loss_fn: nn.Module, splits: dict[str, tuple[Tensor, Tensor]]
) -> pd.DataFrame:
    """Nonzero spectra of ``G``, its parts and ``G`` minus each part, per batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode); cast to float64
            in place.
        loss_fn: BackPACK-extended cross-entropy loss.
        splits: ``{"train": (X, y), "test": (X, y)}`` batches.

    Returns:
        Columns ``split``, ``matrix``, ``k``, ``eigenvalue``, ``num_classes``.

    """
    frames = []
    for split, (inputs, labels) in splits.items():
        gram, probs = _gram_and_probs(model, loss_fn, inputs, labels)
        present = len(labels.unique())
        for name, evals in part_spectra(gram, probs, labels).items():
            frames.append(
                pd.DataFrame(
                    {
                        "split": split,
                        "matrix": name,
                        "k": np.arange(len(evals)),
                        "eigenvalue": evals.cpu().numpy(),
                        "num_classes": present,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def class_mean_table(
    model: nn.Module, loss_fn: nn.Module, splits: dict[str, tuple[Tensor, Tensor]]
) -> pd.DataFrame:
    """Gram matrix of Papyan's class means on each batch (columns: module doc)."""
    frames = []
    for split, (inputs, labels) in splits.items():
        gram, probs = _gram_and_probs(model, loss_fn, inputs, labels)
        means = class_mean_gram(gram, probs, labels).cpu().numpy()
        norms = np.sqrt(np.clip(np.diag(means), 1e-300, None))
        classes = labels.unique().cpu().numpy()
        row, col = np.meshgrid(classes, classes, indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "row": row.ravel(),
                    "col": col.ravel(),
                    "value": means.ravel(),
                    "cosine": (means / np.outer(norms, norms)).ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def outlier_count(ggn: np.ndarray, classes: int) -> int:
    """Number ``m`` of outliers of a descending spectrum: ``C' − 1`` or ``C'``.

    Papyan counts ``C`` outliers; a softmax output has ``C − 1`` nontrivial
    directions per sample, and on the digits networks the gap sits after
    ``C' − 1`` at initialisation. ``m`` is the one of the two with the larger gap
    ``λ_m / λ_{m+1}``.
    """
    candidates = [m for m in (classes - 1, classes) if 0 < m < len(ggn)]
    if not candidates:
        return min(classes, len(ggn))
    return max(candidates, key=lambda m: ggn[m - 1] / ggn[m])


def summarize(table: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Rank, trace, largest and outlier-edge eigenvalues of every matrix.

    The parts' traces sum to the trace of ``G`` (``trace_share`` sums to one).
    """
    rows = []
    for key, frame in table.groupby(group, sort=False):
        labels = dict(zip(group, key, strict=True))
        ggn = np.sort(frame.loc[frame["matrix"] == "G", "eigenvalue"].to_numpy())[::-1]
        count = outlier_count(ggn, int(frame["num_classes"].iloc[0]))
        edge = ggn[count] if len(ggn) > count else np.nan
        for matrix, part in frame.groupby("matrix", sort=False):
            evals = np.sort(part["eigenvalue"].to_numpy())[::-1]
            evals = np.concatenate([evals, np.zeros(count + 1)])
            rows.append(
                {
                    **labels,
                    "matrix": matrix,
                    "rank": len(part),
                    "trace": evals.sum(),
                    "top": evals[0],
                    "trace_share": evals.sum() / ggn.sum(),
                    "num_outliers": count,
                    "lambda_last_outlier": evals[count - 1],
                    "lambda_after": evals[count],
                    "top_over_bulk_edge": evals[0] / edge,
                }
            )
    return pd.DataFrame(rows)


def attribution(summary: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Which part's removal removes the outliers of ``G`` (columns: module doc)."""
    rows = []
    for key, frame in summary.groupby(group, sort=False):
        stats = frame.set_index("matrix")
        ggn = stats.loc["G"]
        row = {
            **dict(zip(group, key, strict=True)),
            "num_outliers": ggn["num_outliers"],
            "top_G": ggn["top"],
            "bulk_edge_G": ggn["lambda_after"],
            "outlier_gap": ggn["lambda_last_outlier"] / ggn["lambda_after"],
        }
        excess = ggn["top"] - ggn["lambda_after"]
        for part in PARTS:
            top = stats.loc[f"G-{part}", "top"]
            share = (ggn["top"] - top) / excess
            row[f"top_without_{part}"] = top
            row[f"removed_share_{part}"] = share
            row[f"removes_{part}"] = bool(share >= REMOVED)
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(attribution_table: pd.DataFrame) -> str:
    """Say in words, per batch, whether the class means carry the outliers."""
    lines = [
        "Papyan's claim: the C outliers of G come from the class means (A1), i.e. "
        "they vanish from G - A1 and not from G minus another part. A part "
        f"removes them when it takes >= {REMOVED:.0%} of λ_1(G) - λ_m+1(G), "
        "m the number of outliers (C-1 or C, at the larger gap)."
    ]
    for _, row in attribution_table.iterrows():
        name = ", ".join(
            f"{c} {row[c]}" for c in ("problem", "split", "step") if c in row
        )
        tops = ", ".join(
            f"G-{p}: {row[f'top_without_{p}']:.3g} ({row[f'removed_share_{p}']:.0%})"
            for p in PARTS
        )
        removing = [p for p in PARTS if row[f"removes_{p}"]]
        if removing == ["A1"]:
            holds = "HOLDS (only removing A1 removes the outliers)"
        elif "A1" in removing:
            holds = f"PARTLY (removing {'/'.join(removing)} removes them)"
        elif removing:
            holds = f"DOES NOT HOLD (removing {'/'.join(removing)}, not A1, does)"
        else:
            holds = "DOES NOT HOLD (no single part removes them)"
        if row["outlier_gap"] < 2:
            holds += "; the outliers barely separate from the bulk (gap < 2)"
        lines.append(
            f"{name}: λ_1(G)={row['top_G']:.3g}, {int(row['num_outliers'])} outliers "
            f"(gap λ_m/λ_m+1={row['outlier_gap']:.2g}), bulk edge "
            f"{row['bulk_edge_G']:.3g}; λ_1 (share of the excess removed) of "
            f"{tops} -> {holds}"
        )
    return "\n".join(lines)
