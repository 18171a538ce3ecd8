r"""The noisy-quadratic part of the benchmark, and a family of quadratics around it.

Uses :mod:`experiments.problems.noisy_quadratic` (SGD, constant damping on a fine
grid, the untuned bootstrap damping with and without the optimiser's safeguards,
and the ViViT paper's per-step percentile rule). The score is the median final
distance to the minimum over seeds, as a ratio to the best constant damping.

The family (:data:`FAMILY`) adds quadratics outside the benchmark (other noise
levels, dimension, batch size, horizon, start, tail index and growth), so that a
damping rule is judged on more than the three cases it could be tuned on::

    nice python -m experiments.optimizer_benchmark.quadratic --seeds 200 \\
        --out results/quadratic_family

writes one checked table per (member, seed) under ``--out/tables`` (resumable),
``quadratic_family.csv`` (final distances), ``quadratic_family_summary.csv`` and
``quadratic_family.png``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.common.results import cached_table, write_environment, write_table
from experiments.problems.noisy_quadratic import (
    NoisyQuadratic,
    optimizer_names,
    run,
)

#: Constant dampings of the benchmark: 4 per decade from 1e-2 to 1e2.
DAMPINGS = [float(f"{v:.3g}") for v in np.logspace(-2, 2, 17)]

#: Constant dampings of the family: 4 per decade from 1e-3 to 1e3.
FAMILY_DAMPINGS = [float(f"{v:.3g}") for v in np.logspace(-3, 3, 25)]

#: Damping rules compared with the best constant (besides SGD in the benchmark).
RULES = ("bootstrap", "bootstrap_safeguarded", "bootstrap_percentile")


@dataclass(frozen=True)
class Member:
    """One quadratic of the family.

    Attributes:
        name: Row label.
        problem: The noisy quadratic.
        steps: Number of steps.
    """

    name: str
    problem: NoisyQuadratic
    steps: int = 20


#: Damping rules run on every family member (the benchmark's plus the rule
#: without memory across steps).
FAMILY_RULES = (*RULES, "bootstrap_no_history")

#: The family: the benchmark's noise models, then variants outside it.
FAMILY = (
    Member("gaussian", NoisyQuadratic()),
    Member("heavy_tailed", NoisyQuadratic(noise="heavy_tailed")),
    Member("growing", NoisyQuadratic(noise="growing")),
    Member("gamma_var=2e3", NoisyQuadratic(gamma_var=2e3)),
    Member("gamma_var=2e5", NoisyQuadratic(gamma_var=2e5)),
    Member("lambda_var=20", NoisyQuadratic(lambda_var=20.0)),
    Member("lambda_var=2e3", NoisyQuadratic(lambda_var=2e3)),
    Member("dim=50", NoisyQuadratic(dim=50)),
    Member("batch=32", NoisyQuadratic(batch_size=32)),
    Member("init=10", NoisyQuadratic(init=10.0)),
    Member("init=1", NoisyQuadratic(init=1.0)),
    Member("steps=50", NoisyQuadratic(), steps=50),
    Member(
        "heavy_tailed,tail=1.5,batch=64",
        NoisyQuadratic(noise="heavy_tailed", tail_index=1.5, batch_size=64),
    ),
    Member(
        "growing,growth=99,gamma_var=2e3",
        NoisyQuadratic(noise="growing", growth=99.0, gamma_var=2e3),
    ),
)


def final_distances(
    problem: NoisyQuadratic, names: list[str], seed: int, steps: int
) -> pd.DataFrame:
    """Final distance and loss of every named optimizer on one problem and seed."""
    rows = []
    for name in names:
        last = run(problem, name, seed, steps).iloc[-1]
        rows.append({"method": name, "distance": last["distance"],
                     "loss": last["loss"]})  # fmt: skip
    return pd.DataFrame(rows)


def run_noise_model(noise: str, seed: int, steps: int) -> pd.DataFrame:
    """Final distance and loss of every optimizer on one noise model and seed."""
    names = [*optimizer_names(DAMPINGS), "bootstrap_percentile"]
    return final_distances(NoisyQuadratic(noise=noise), names, seed, steps)


def run_member(member: Member, seed: int) -> pd.DataFrame:
    """Final distances of the constant grid and the rules on one family member."""
    names = [f"constant_{d:.3g}" for d in FAMILY_DAMPINGS]
    names += list(FAMILY_RULES)
    return final_distances(member.problem, names, seed, member.steps)


#: Resamples of the seeds for the ratio's confidence interval.
CI_RESAMPLES = 1000


def summarize(runs: pd.DataFrame, key: str = "noise") -> pd.DataFrame:
    """Per problem: best constant, damping rules, their ratios.

    The ratio's 90 % interval comes from resampling the seeds with replacement
    (the same seeds for both methods; the best constant stays the one chosen on
    all seeds), so it shows how much the score moves with the seed count.

    Args:
        runs: Columns ``key, seed, method, distance``.
        key: Column naming the problem. Default: ``"noise"``.

    Returns:
        One row per problem and compared optimizer with the median final
        distance, its ratio to the best constant damping of the grid and the
        ratio's interval (``ratio_low``, ``ratio_high``); ``best_at_edge`` says
        whether the best constant is the grid's smallest or largest.
    """
    rows = []
    for problem in runs[key].drop_duplicates():
        part = runs[runs[key] == problem]
        medians = part.groupby("method", sort=False)["distance"].median()
        constants = medians[[n for n in medians.index if n.startswith("constant_")]]
        best = constants.idxmin()
        table = part.pivot_table(index="seed", columns="method", values="distance")
        draws = np.random.default_rng(0).integers(
            0, len(table), (CI_RESAMPLES, len(table))
        )
        reference = np.median(table[best].to_numpy()[draws], axis=1)
        others = [n for n in medians.index if not n.startswith("constant_")]
        for name in [best, *others]:
            ratios = np.median(table[name].to_numpy()[draws], axis=1) / reference
            rows.append({
                key: problem, "method": name,
                "median_distance": medians[name],
                "max_distance": part.loc[part["method"] == name, "distance"].max(),
                "ratio_to_best_constant": medians[name] / constants[best],
                "ratio_low": float(np.quantile(ratios, 0.05)),
                "ratio_high": float(np.quantile(ratios, 0.95)),
                "best_at_edge": best in (constants.index[0], constants.index[-1]),
                "seeds": int(part["seed"].nunique()),
            })  # fmt: skip
    return pd.DataFrame(rows)


def family_runs(members: list[Member], seeds: int, out: Path, progress: bool):
    """Every (member, seed) table, computed or reused from ``out / 'tables'``."""
    jobs = [(m, s) for m in members for s in range(seeds)]
    frames = []
    for member, seed in tqdm(jobs, desc="quadratic family", disable=not progress):
        options = {"problem": member.problem.to_dict(), "steps": member.steps,
                   "dampings": FAMILY_DAMPINGS}  # fmt: skip
        frames.append(cached_table(
            out, {"member": member.name, "seed": seed},
            lambda m=member, s=seed: run_member(m, s), options=options,
        ))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


#: Ratio range shown by :func:`figure` (larger ratios are drawn at the edge).
SHOWN = (0.2, 10.0)


def figure(summary: pd.DataFrame):
    """Ratio to the best constant (median, 90 % seed interval) per member."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - only for the figure

    members = list(summary["member"].drop_duplicates())
    fig, ax = plt.subplots(figsize=(7.0, 0.35 * len(members) + 1.2))
    for i, name in enumerate(FAMILY_RULES):
        rows = summary[summary["method"] == name].set_index("member").loc[members]
        y = np.arange(len(members)) + 0.18 * (i - 1.5)
        columns = ["ratio_to_best_constant", "ratio_low", "ratio_high"]
        mid, low, high = np.clip(rows[columns].to_numpy().T, *SHOWN)
        line = ax.errorbar(mid, y, xerr=[mid - low, high - mid], fmt="o", ms=3,
                           label=name, capsize=2)  # fmt: skip
        for value, at in zip(rows["ratio_to_best_constant"], y):
            if value > SHOWN[1]:
                ax.annotate(f"{value:.2g}", (SHOWN[1], at), xytext=(-4, 0),
                            textcoords="offset points", ha="right", va="center",
                            fontsize=6, color=line[0].get_color())  # fmt: skip
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.2, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(*SHOWN)
    ax.set_yticks(np.arange(len(members)), members, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median final distance / best constant damping (90 % seed CI; "
                  "dashed: 1.2)", fontsize=8)  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the family sweep and write its tables and figure (see module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--members", nargs="+", default=None,
                        help="member names (default: all of FAMILY)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/quadratic_family"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in FAMILY}
    unknown = set(args.members or []) - set(by_name)
    if unknown or args.seeds < 1:
        parser.error(f"unknown members {sorted(unknown)} (known: {list(by_name)})"
                     if unknown else "--seeds must be >= 1")  # fmt: skip
    members = [by_name[n] for n in args.members] if args.members else list(FAMILY)
    write_environment(args.out, vars(args))
    runs = family_runs(members, args.seeds, args.out, not args.no_progress)
    write_table(runs, args.out / "quadratic_family.csv")
    summary = summarize(runs, key="member")
    write_table(summary, args.out / "quadratic_family_summary.csv")
    shown = summary[["member", "method", "ratio_to_best_constant", "ratio_low",
                     "ratio_high", "max_distance"]]  # fmt: skip
    print(shown.to_string(index=False, float_format="%.3g"))
    if not args.no_plot:
        from experiments.common.plotting import save  # noqa: PLC0415

        save(figure(summary), args.out / "quadratic_family.png", dpi=150)
    return summary


if __name__ == "__main__":
    main()
