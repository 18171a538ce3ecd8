"""Compare SGD, Adam, Gram-space and Lanczos damped Newton at matched steps and time.

Usage::

    python -m experiments.lanczos_newton.run            # 2 seeds, 100 steps, 20 s
    python -m experiments.lanczos_newton.run --quick    # 1 seed, 30 steps, 3 s
    python -m experiments.lanczos_newton.run --optimizers sgd lanczos_bootstrap

Every optimizer trains the same CNN (default ``digits_small_cnn``, see
:func:`experiments.problems.small_cnn`) from the same initialisation on
the same mini-batches (batch size 128): first ``--steps`` steps, then on until its
training wall time reaches ``--time-budget`` seconds (at most ``--max-steps``). The
five optimizers:

* ``sgd`` (momentum 0.9) and ``adam``;
* ``gram_bootstrap``: :class:`vivitlib.optim.DampedNewton` along all nontrivial
  eigen-directions of the mini-batch GGN (1 MC sample), bootstrap damping;
* ``lanczos_constant``: :class:`vivitlib.optim.LanczosDampedNewton`, top-``k`` GGN
  eigenpairs of a fixed curvature batch refreshed every ``T`` steps, step along
  them with the refresh eigenvalues ``|λ_k|`` and a constant damping — the Deep
  Curvature suite's Lanczos optimiser as far as this optimiser expresses it;
* ``lanczos_bootstrap``: the same directions, with the current batch's per-sample
  ``γ_nk, λ_nk`` and bootstrap damping.

Results go to ``--out`` (default ``results/lanczos_newton``): ``tables/<run>.csv``
(one file per optimizer and seed, named with a hash of its hyperparameters listed in
``configs.csv``; present files are skipped, so an interrupted study resumes),
``curves.csv`` (every evaluation), ``summary.csv`` (matched steps and matched time,
means over seeds), ``lanczos_newton.png`` and ``environment.json``.

Hyperparameters were picked on seed 0 at 100 steps by final training loss
(``python -m experiments.lanczos_newton.tune``; diverged runs excluded): SGD lr
{0.03, 0.1, 0.3} → 0.1; Adam lr {1e-3, 3e-3, 1e-2} → 1e-2; Gram bootstrap floor
{0.1, 1, 3, 10} → 3 (0.1 diverges); Lanczos constant δ {0.1, 1, 3} → 3 (0.1 diverges);
Lanczos bootstrap floor {0.1, 1, 3} → 1 (0.1 diverges). Newton lr 1, 1 MC sample.
Lanczos: GGN, ``k = 50``, ``T = 10``, curvature batch 128 (a probe at 60 steps: k = 20
stalls at train loss 1.67 whatever ``T``; k = 50 reaches 0.56).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
from experiments.lanczos_newton import plot
from experiments.lanczos_newton.training import (
    OPTIMIZERS,
    SMALL_CNN,
    RunConfig,
    train,
)
from experiments.problems import get_problem

STUDY = "lanczos_newton"
METRICS = ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = base_parser(STUDY, __doc__.splitlines()[0], problem=SMALL_CNN.name)
    add = parser.add_argument
    add("--seeds", type=int, default=2, help="number of seeds")
    add("--steps", type=int, default=100, help="matched-steps budget")
    add("--time-budget", type=float, default=20.0, help="matched-time budget [s]")
    add("--max-steps", type=int, default=4000, help="cap while filling the time")
    add("--batch-size", type=int, default=128)
    add("--eval-every", type=int, default=10, help="evaluation period in steps")
    add("--time-points", type=int, default=30, help="evaluations along the time")
    add("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    add("--sgd-lr", type=float, default=0.1)
    add("--adam-lr", type=float, default=1e-2)
    add("--newton-lr", type=float, default=1.0)
    add("--gram-floor", type=float, default=3.0, help="Gram bootstrap min δ")
    add("--lanczos-damping", type=float, default=3.0, help="constant δ")
    add("--lanczos-floor", type=float, default=1.0, help="Lanczos bootstrap min δ")
    add("--mc-samples", type=int, default=1)
    add("--k", type=int, default=50, help="Lanczos directions")
    add("--refresh-every", type=int, default=10, help="steps between refreshes")
    add("--curvature-batch-size", type=int, default=128)
    add("--curvature", choices=("ggn", "hessian"), default="ggn")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, min(args.steps, 30)
        args.time_budget = min(args.time_budget, 3.0)
    positive = (args.seeds, args.steps, args.batch_size, args.eval_every, args.k)
    if min(positive) < 1 or args.time_budget < 0:
        parser.error("--seeds, --steps, --batch-size, --eval-every, --k must be >= 1")
    args.max_steps = max(args.max_steps, args.steps)
    return args


def configs(args: argparse.Namespace) -> list[RunConfig]:
    """One configuration per (seed, optimizer)."""
    lrs = {"sgd": args.sgd_lr, "adam": args.adam_lr}
    dampings = {
        "gram_bootstrap": args.gram_floor,
        "lanczos_constant": args.lanczos_damping,
        "lanczos_bootstrap": args.lanczos_floor,
    }
    return [
        RunConfig(
            optimizer=name,
            lr=lrs.get(name, args.newton_lr),
            steps=args.steps,
            time_budget=args.time_budget,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            seed=args.seed + offset,
            eval_every=args.eval_every,
            time_points=args.time_points,
            damping=dampings.get(name, 0.0),
            mc_samples=args.mc_samples,
            k=args.k,
            refresh_every=args.refresh_every,
            curvature_batch_size=args.curvature_batch_size,
            curvature=args.curvature,
        )
        for offset in range(args.seeds)
        for name in args.optimizers
    ]


def config_hash(problem: str, config: RunConfig) -> str:
    """Short stable hash of a run's problem and hyperparameters (file names)."""
    text = json.dumps({"problem": problem, **asdict(config)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def config_table(problem: str, runs: list[RunConfig]) -> pd.DataFrame:
    """Every run's hyperparameters with the hash naming its table."""
    return pd.DataFrame(
        [{"config": config_hash(problem, c), "problem": problem, **asdict(c)}
         for c in runs]
    )  # fmt: skip


def _pick(run: pd.DataFrame, steps: int, time_budget: float) -> dict:
    """The rows of one run at the step budget and at the time budget."""
    at_steps = run[run["step"] <= steps].iloc[-1]
    in_time = run[run["time_s"] <= time_budget]
    at_time = in_time.iloc[-1] if len(in_time) else run.iloc[0]
    return {"matched_steps": at_steps, "matched_time": at_time}


def summarize(curves: pd.DataFrame, steps: int, time_budget: float) -> pd.DataFrame:
    """Means over seeds at matched steps and at matched time, with costs.

    At matched steps each run's row at ``steps`` is used (its last row if it diverged
    before); at matched time its last evaluation within ``time_budget`` seconds.
    ``time_per_step_ms`` is the training time over the steps taken (set-up and
    refreshes included), ``refresh_share`` the part of it spent in refreshes.
    """
    rows = []
    for (name, seed), run in curves.groupby(["optimizer", "seed"], sort=False):
        for regime, row in _pick(run, steps, time_budget).items():
            record = {"regime": regime, "optimizer": name, "seed": seed}
            record.update({c: row[c] for c in ["step", "time_s", *METRICS]})
            record["time_per_step_ms"] = 1e3 * row["time_s"] / max(row["step"], 1)
            record["refresh_share"] = row["refresh_time_s"] / row["time_s"]
            record["refreshes"] = row["refreshes"]
            record["products_per_refresh"] = row["products_per_refresh"]
            record["diverged"] = bool(run["diverged"].astype(bool).any())
            rows.append(record)
    frame = pd.DataFrame(rows)
    columns = [c for c in frame.columns if c not in ("regime", "optimizer", "seed")]
    summary = frame.groupby(["regime", "optimizer"], sort=False)[columns].mean()
    summary["seeds"] = frame.groupby(["regime", "optimizer"], sort=False).size()
    return summary.reset_index()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run (or resume) the comparison; write tables, summary and figure."""
    args = parse_args(argv)
    setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    write_environment(args.out, vars(args))
    frames, runs = [], configs(args)
    write_table(config_table(problem.name, runs), args.out / "configs.csv")
    for config in tqdm(runs, desc=STUDY, unit="run", disable=args.no_progress):
        key = {"optimizer": config.optimizer, "seed": config.seed}
        key["config"] = config_hash(problem.name, config)
        compute = lambda c=config: train(problem, data, c)  # noqa: E731
        frames.append(cached_table(args.out, key, compute))
    curves = combine(frames, args.out / "curves.csv")
    summary = summarize(curves, args.steps, args.time_budget)
    write_table(summary, args.out / "summary.csv")
    fig = save(plot.figure(curves, summary, args.steps), args.out / f"{STUDY}.png")
    columns = ["regime", "optimizer", "step", "time_s", *METRICS]
    columns += ["time_per_step_ms", "products_per_refresh"]
    with pd.option_context("display.width", 200):
        print(summary[columns].to_string(index=False, float_format="%.4g"))
    report(STUDY, args.out / "summary.csv", [fig])
    return summary


if __name__ == "__main__":
    main()
