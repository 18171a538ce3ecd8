"""The noisy-quadratic part of the benchmark: every noise model, many seeds.

Uses :mod:`experiments.problems.noisy_quadratic` (SGD, constant damping on a fine
grid, untuned bootstrap with and without the optimiser's safeguards). The score
is the median final distance to the minimum over seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.problems.noisy_quadratic import (
    NOISE_MODELS,
    NoisyQuadratic,
    optimizer_names,
    run,
)

#: Constant dampings: 4 per decade from 1e-2 to 1e2.
DAMPINGS = [float(f"{v:.3g}") for v in np.logspace(-2, 2, 17)]


def run_noise_model(noise: str, seed: int, steps: int) -> pd.DataFrame:
    """Final distance and loss of every optimizer on one noise model and seed."""
    problem = NoisyQuadratic(noise=noise)
    rows = []
    for name in optimizer_names(DAMPINGS):
        frame = run(problem, name, seed, steps)
        last = frame.iloc[-1]
        rows.append({"method": name, "distance": last["distance"],
                     "loss": last["loss"]})  # fmt: skip
    return pd.DataFrame(rows)


#: Resamples of the seeds for the ratio's confidence interval.
CI_RESAMPLES = 1000


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per noise model: best constant, bootstrap variants, their ratios.

    The ratio's 90 % interval comes from resampling the seeds with replacement
    (the same seeds for both methods; the best constant stays the one chosen on
    all seeds), so it shows how much the score moves with the seed count.

    Args:
        runs: Columns ``noise, seed, method, distance``.

    Returns:
        One row per noise model and compared optimizer with the median final
        distance, its ratio to the best constant damping of the grid and the
        ratio's interval (``ratio_low``, ``ratio_high``).
    """
    rows = []
    for noise in [n for n in NOISE_MODELS if n in set(runs["noise"])]:
        part = runs[runs["noise"] == noise]
        medians = part.groupby("method", sort=False)["distance"].median()
        constants = medians[[n for n in medians.index if n.startswith("constant_")]]
        best = constants.idxmin()
        table = part.pivot_table(index="seed", columns="method", values="distance")
        draws = np.random.default_rng(0).integers(
            0, len(table), (CI_RESAMPLES, len(table))
        )
        reference = np.median(table[best].to_numpy()[draws], axis=1)
        for name in ("SGD", best, "bootstrap", "bootstrap_safeguarded"):
            ratios = np.median(table[name].to_numpy()[draws], axis=1) / reference
            rows.append({
                "noise": noise, "method": name,
                "median_distance": medians[name],
                "max_distance": part.loc[part["method"] == name, "distance"].max(),
                "ratio_to_best_constant": medians[name] / constants[best],
                "ratio_low": float(np.quantile(ratios, 0.05)),
                "ratio_high": float(np.quantile(ratios, 0.95)),
                "seeds": int(part["seed"].nunique()),
            })  # fmt: skip
    return pd.DataFrame(rows)
