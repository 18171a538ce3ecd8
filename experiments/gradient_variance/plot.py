"""Gradient, curvature and Hessian variance against training steps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.common import plotting
from experiments.common.spectrum import THRESHOLDS, tag

HESSIAN = ("hessian_lambda_max", "hessian_trace", "hessian_frobenius")


def plot_variance(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One figure per problem: gradient, curvature, SNR share, Hessian norms.

    Per-batch quantities are shown as the mean over the batches with a band from
    the smallest to the largest batch.
    """
    paths = []
    for problem, frame in table.groupby("problem"):
        fig, axes = plotting.subplots(1, 4, width=3.6)
        for optimizer, rows in frame.groupby("optimizer"):
            per_batch = rows.groupby(["step", "batch"]).first().reset_index()
            steps = sorted(per_batch["step"].unique())
            x = [s + 1 for s in steps]
            by_step = per_batch.groupby("step")
            _band(axes[0, 0], x, by_step["grad_norm_sq"], f"{optimizer} ‖ḡ‖²", "o-")
            _band(
                axes[0, 0], x, by_step["grad_var_trace"], f"{optimizer} tr Σ_g", "s--"
            )
            curv = rows.groupby("step")[["eigenvalue", "lambda_var"]].median()
            axes[0, 1].loglog(x, curv["eigenvalue"], "o-", label=f"{optimizer} λ_k")
            axes[0, 1].loglog(
                x,
                curv["lambda_var"].clip(lower=1e-30) ** 0.5,
                "s--",
                label=f"{optimizer} std(λ_nk)",
            )
            _band(
                axes[0, 1],
                x,
                (per_batch["ggn_sample_var"] ** 0.5).groupby(per_batch["step"]),
                f"{optimizer} std(G_n) (Frobenius)",
                "^:",
            )
            for fraction, style in zip(THRESHOLDS, ("o-", "s--", "^:"), strict=True):
                column = f"lambda_snr_gt1_share_{tag(fraction)}"
                axes[0, 2].semilogx(
                    x,
                    by_step[column].mean(),
                    style,
                    label=f"{optimizer}, λ > {fraction:g}·λ_max",
                )
            if HESSIAN[0] in per_batch:
                for column, style in zip(HESSIAN, ("o-", "s--", "^:"), strict=True):
                    name = column.removeprefix("hessian_")
                    _band(axes[0, 3], x, by_step[column], f"{optimizer} {name}", style)
                spread = per_batch["hessian_sample_var"].clip(lower=0) ** 0.5
                _band(axes[0, 3], x, spread.groupby(per_batch["step"]),
                      f"{optimizer} std(H_n) (Frobenius)", "d-.")  # fmt: skip
        axes[0, 0].set_title("gradient: signal vs per-sample variance", fontsize=9)
        axes[0, 1].set_title("GGN: curvature and its per-sample spread", fontsize=9)
        axes[0, 2].set_title("share of directions with SNR(λ_k) > 1", fontsize=9)
        axes[0, 3].set_title("batch Hessian (band: min-max over batches)", fontsize=9)
        for ax in axes[0]:
            ax.set_xlabel("step + 1")
            ax.legend(fontsize=6)
        paths.append(plotting.save(fig, Path(out_dir) / f"variance_{problem}.png"))
    return paths


def _band(ax, x, grouped, label: str, style: str) -> None:
    mean, low, high = grouped.mean(), grouped.min(), grouped.max()
    (line,) = ax.loglog(x, mean.abs(), style, label=label)
    ax.fill_between(x, low.abs(), high.abs(), color=line.get_color(), alpha=0.2)
