"""Run the noisy-quadratic comparison (ViViT paper, Figure 3) over many seeds.

Compares SGD, constant damping on a fine grid (4 per decade, ``1e-2..1e2``), the
untuned bootstrap damping and the bootstrap with the optimiser's safeguards, at
the original study's gradient noise ``σ_γ² = 2·10⁴`` by default.

Usage::

    MPLBACKEND=agg python -m experiments.noisy_quadratic.run            # 100 seeds
    python -m experiments.noisy_quadratic.run --seeds 5 --steps 10     # quick look
    python -m experiments.noisy_quadratic.run --noise heavy_tailed --out results/nq_ht

Writes to ``--out`` (default ``results/noisy_quadratic``): ``environment.json``
(arguments and environment), ``tables/optimizer=<name>_seed=<s>_opt-<digest>.csv``
(one checked table per optimizer and seed, keyed by every setting that changes its
numbers, see :func:`settings`; valid tables are reused, so interrupted studies resume,
and damaged ones are recomputed), ``summary.csv`` (loss and distance statistics per
optimizer and step), ``final.csv`` (final loss and distance per run) and
``noisy_quadratic.png``. A second run on the same ``--out`` is refused while the first
one writes. The noise model is documented in
:mod:`experiments.problems.noisy_quadratic`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.common.plotting import save
from experiments.common.results import cached_table, write_environment, write_table
from experiments.noisy_quadratic import plot
from experiments.problems.noisy_quadratic import (
    NOISE_MODELS,
    NoisyQuadratic,
    optimizer_names,
    run,
)

#: Constant dampings compared: 4 per decade from 1e-2 to 1e2.
DEFAULT_DAMPINGS = [float(f"{v:.3g}") for v in np.logspace(-2, 2, 17)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds")
    parser.add_argument("--steps", type=int, default=20, help="steps per run")
    parser.add_argument("--dim", type=int, default=20, help="dimension D")
    parser.add_argument("--batch-size", type=int, default=128, help="samples N")
    parser.add_argument("--gamma-var", type=float, default=2e4, help="σ_γ²")
    parser.add_argument("--noise", choices=NOISE_MODELS, default="gaussian")
    parser.add_argument("--lambda-var", type=float, default=200.0, help="σ_λ²")
    parser.add_argument(
        "--dampings", type=float, nargs="+", default=DEFAULT_DAMPINGS,
        help="constant dampings to compare",
    )  # fmt: skip
    parser.add_argument("--sgd-lr", type=float, default=1e-3)
    parser.add_argument("--newton-lr", type=float, default=1.0)
    parser.add_argument(
        "--num-candidates", type=int, default=61,
        help="bootstrap grid size, 10**linspace(-4, 2, n)",
    )  # fmt: skip
    parser.add_argument("--damping-seed", type=int, default=0,
                        help="seed whose bootstrap dampings are plotted")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/noisy_quadratic"))
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    if not 0 <= args.damping_seed < args.seeds:
        parser.error("--damping-seed must lie in [0, --seeds)")
    return args


def settings(args: argparse.Namespace, problem: NoisyQuadratic) -> dict:
    """Everything that changes the numbers of one (optimizer, seed) run.

    Not the number of seeds nor the list of constant dampings: they only choose which
    runs exist (a constant damping's value is part of its optimizer name).
    """
    return {
        "problem": problem.to_dict(),
        "steps": args.steps,
        "sgd_lr": args.sgd_lr,
        "newton_lr": args.newton_lr,
        "num_candidates": args.num_candidates,
    }


def make_problem(args: argparse.Namespace) -> NoisyQuadratic:
    """The noisy quadratic of the parsed options."""
    return NoisyQuadratic(
        dim=args.dim,
        batch_size=args.batch_size,
        gamma_var=args.gamma_var,
        lambda_var=args.lambda_var,
        noise=args.noise,
    )


def run_table(
    args: argparse.Namespace, problem: NoisyQuadratic, name: str, seed: int
) -> pd.DataFrame:
    """The table of one (optimizer, seed) run: its valid checked table, or computed."""

    def one_run() -> pd.DataFrame:
        frame = run(
            problem, name, seed, args.steps, args.sgd_lr, args.newton_lr,
            args.num_candidates,
        )  # fmt: skip
        return frame.drop(columns=["optimizer", "seed"])  # the key's columns

    config = {"optimizer": name, "seed": seed}
    return cached_table(args.out, config, one_run, options=settings(args, problem))


def compute(args: argparse.Namespace, problem: NoisyQuadratic) -> pd.DataFrame:
    """Run every (optimizer, seed) pair whose checked table is missing or damaged.

    Returns:
        The runs' tables, concatenated in (seed, optimizer) order.

    """
    names = optimizer_names(args.dampings)
    jobs = [(name, seed) for seed in range(args.seeds) for name in names]
    bar = tqdm(jobs, desc="noisy quadratic", unit="run", disable=args.no_progress)
    frames = [run_table(args, problem, name, seed) for name, seed in bar]
    return pd.concat(frames, ignore_index=True)


def summarize(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Loss/distance statistics per optimizer and step, and final values per run."""
    grouped = runs.groupby(["optimizer", "step"], sort=False)
    stats = []
    for column in ("loss", "distance"):
        agg = grouped[column].agg(
            mean="mean",
            median="median",
            q25=lambda x: x.quantile(0.25),
            q75=lambda x: x.quantile(0.75),
            min="min",
            max="max",
        )
        stats.append(agg.add_prefix(f"{column}_"))
    summary = pd.concat(stats, axis=1).reset_index()
    last = runs[runs["step"] == runs["step"].max()]
    final = last[["optimizer", "seed", "loss", "distance"]].reset_index(drop=True)
    return summary, final


def verdict(final: pd.DataFrame) -> str:
    """Which wins: the best constant damping or the untuned bootstrap (median)."""
    medians = final.groupby("optimizer", sort=False)["distance"].median()
    constants = medians[[n for n in medians.index if n.startswith("constant_")]]
    best = constants.idxmin()
    lines = [f"best constant damping: {best} (median distance {constants[best]:.3g})"]
    for name in ("bootstrap", "bootstrap_safeguarded"):
        ratio = medians[name] / constants[best]
        winner = name if ratio < 1 else best
        lines.append(
            f"{name}: median {medians[name]:.3g} = {ratio:.2f} x best constant "
            f"-> {winner} wins"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    problem = make_problem(args)
    write_environment(args.out, vars(args))  # takes the folder's lock
    runs = compute(args, problem)
    summary, final = summarize(runs)
    write_table(summary, args.out / "summary.csv")
    write_table(final, args.out / "final.csv")
    table = final.groupby("optimizer", sort=False)["distance"].describe()
    print(table[["min", "25%", "50%", "75%", "max"]].to_string(float_format="%.3g"))
    print(verdict(final))
    if not args.no_plot:
        example = runs[
            (runs["optimizer"] == "bootstrap") & (runs["seed"] == args.damping_seed)
        ]
        figure = plot.figure(summary, final, example, problem)
        save(figure, args.out / "noisy_quadratic.png", dpi=150)
        print(f"wrote {args.out / 'noisy_quadratic.png'}")


if __name__ == "__main__":
    main()
