"""Gradient and curvature variance against training steps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.common import plotting


def plot_variance(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One figure per problem: gradient norm vs variance, curvature variance, SNR."""
    paths = []
    for problem, frame in table.groupby("problem"):
        fig, axes = plotting.subplots(1, 3, width=3.6)
        for optimizer, rows in frame.groupby("optimizer"):
            per_batch = rows.groupby(["step", "batch"]).first().groupby("step")
            means = per_batch[
                ["grad_norm_sq", "grad_var_trace", "lambda_frac_snr_gt1"]
            ].mean()
            steps = means.index.to_numpy() + 1
            axes[0, 0].loglog(
                steps, means["grad_norm_sq"], "o-", label=f"{optimizer} ‖ḡ‖²"
            )
            axes[0, 0].loglog(
                steps, means["grad_var_trace"], "s--", label=f"{optimizer} tr Σ_g"
            )
            curv = rows.groupby("step")[["eigenvalue", "lambda_var"]].median()
            axes[0, 1].loglog(steps, curv["eigenvalue"], "o-", label=f"{optimizer} λ_k")
            axes[0, 1].loglog(
                steps,
                curv["lambda_var"].clip(lower=1e-30) ** 0.5,
                "s--",
                label=f"{optimizer} std(λ_nk)",
            )
            axes[0, 2].semilogx(
                steps, means["lambda_frac_snr_gt1"], "o-", label=optimizer
            )
        axes[0, 0].set_title("gradient: signal vs per-sample variance", fontsize=9)
        axes[0, 1].set_title("top directions: curvature and its spread", fontsize=9)
        axes[0, 2].set_title("fraction of directions with SNR(λ_k) > 1", fontsize=9)
        for ax in axes[0]:
            ax.set_xlabel("step + 1")
            ax.legend(fontsize=6)
        paths.append(plotting.save(fig, Path(out_dir) / f"variance_{problem}.png"))
    return paths
