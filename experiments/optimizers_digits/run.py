"""Train a small network on digits with SGD, Adam and damped Newton; compare.

Usage::

    python -m experiments.optimizers_digits.run               # 3 seeds, 300 steps
    python -m experiments.optimizers_digits.run --quick       # 1 seed, 60 steps
    python -m experiments.optimizers_digits.run --optimizers sgd newton_bootstrap

Every optimizer trains the same model (``--problem``, default ``digits_mlp``: a
64-32-32-10 ReLU MLP) from the same initialisation on the same mini-batches for
the same number of steps. Results go to ``--out`` (default
``results/optimizers_digits``): ``tables/<config>.csv`` (one file per optimizer and
seed; present files are skipped, so interrupted studies resume), ``curves.csv``
(all evaluations), ``summary.csv`` (final values and time per step per optimizer),
``optimizers_digits.png`` and ``environment.json``.

Hyperparameter defaults were picked on seed 0 from small grids: SGD (momentum 0.9)
lr 0.1 from {0.05, 0.2}; Adam lr 0.01 from {1e-3, 1e-2}; constant damping 3 from
{0.01, 0.1, 0.3, 1, 3} (lr 1; δ ≤ 0.3 diverges). ``newton_bootstrap`` uses the
library's default grid ``1e-4..1e2``; ``newton_bootstrap_floor`` only candidates
``≥ --damping``. The bootstrap guards against noise in the quadratic model, not
against the model's failure far from the current parameters: with small candidates
it takes near-undamped steps along flat, low-noise directions, which overshoot on a
network (the default-grid run diverges in its first steps). These three run with
``safeguards=False`` (the plain method, as tuned above); ``newton_default`` is the
untuned ``DampedNewton(params)`` with its safeguards (no closure: adapted one step
late). The tuned comparison with peers is :mod:`experiments.optimizer_benchmark`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import pandas as pd
from tqdm import tqdm

from experiments.common.cli import base_parser, report, setup
from experiments.common.plotting import save
from experiments.common.results import (
    cached_table,
    combine,
    write_environment,
    write_table,
)
from experiments.optimizers_digits import plot
from experiments.optimizers_digits.training import OPTIMIZERS, RunConfig, train
from experiments.problems import get_problem

STUDY = "optimizers_digits"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(STUDY, "SGD, Adam and damped Newton on digits.")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS
    )
    parser.add_argument("--sgd-lr", type=float, default=0.1)
    parser.add_argument("--adam-lr", type=float, default=0.01)
    parser.add_argument("--newton-lr", type=float, default=1.0)
    parser.add_argument("--damping", type=float, default=3.0, help="constant δ")
    parser.add_argument("--bootstrap-min", type=float, default=1e-4)
    parser.add_argument("--mc-samples", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, min(args.steps, 60)
    if min(args.seeds, args.steps, args.batch_size, args.eval_every) < 1:
        parser.error("--seeds, --steps, --batch-size and --eval-every must be >= 1")
    return args


def configs(args: argparse.Namespace) -> list[RunConfig]:
    lrs = {"sgd": args.sgd_lr, "adam": args.adam_lr}
    return [
        RunConfig(
            optimizer=name,
            lr=lrs.get(name, args.newton_lr),
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed + offset,
            eval_every=args.eval_every,
            damping=args.damping,
            bootstrap_min=args.bootstrap_min,
            mc_samples=args.mc_samples,
        )
        for offset in range(args.seeds)
        for name in args.optimizers
    ]


def summarize(curves: pd.DataFrame) -> pd.DataFrame:
    """Final metrics (mean and spread over seeds) and time per step per optimizer."""
    last_step = curves.groupby(["optimizer", "seed"])["step"].transform("max")
    last = curves[curves["step"] == last_step]
    metrics = ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]
    final = last.groupby("optimizer", sort=False)[metrics].agg(["mean", "min", "max"])
    final.columns = [f"{a}_{b}" for a, b in final.columns]
    timing = curves.groupby("optimizer", sort=False).agg(
        step_time_ms=("step_time_s", lambda x: 1e3 * x.mean()),
        diverged_runs=("diverged", lambda x: int(x.astype(bool).sum())),
        stepped_directions=("stepped_directions", "mean"),
    )
    return final.join(timing).reset_index()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    write_environment(args.out, vars(args))
    frames = []
    runs = configs(args)
    for config in tqdm(runs, desc=STUDY, unit="run", disable=args.no_progress):
        key = {"problem": problem.name, **asdict(config)}
        frames.append(
            cached_table(args.out, key, lambda c=config: train(problem, data, c))
        )
    curves = combine(frames, args.out / "curves.csv")
    summary = summarize(curves)
    write_table(summary, args.out / "summary.csv")
    figure = save(plot.figure(curves), args.out / f"{STUDY}.png")
    columns = ["optimizer", "train_loss_mean", "test_accuracy_mean", "step_time_ms"]
    print(summary[columns].to_string(index=False, float_format="%.4g"))
    report(STUDY, args.out / "summary.csv", [figure])
    return summary


if __name__ == "__main__":
    main()
