r"""Benchmark: damped Newton (untuned defaults) against tuned peers (issue 12).

Usage::

    python -m experiments.optimizer_benchmark.run --quick        # minutes, 2 cores
    python -m experiments.optimizer_benchmark.run --workers 15   # full (see below)
    python -m experiments.optimizer_benchmark.run --problems cifar10_3c3d \\
        --data-dir DIR                                           # when data exist

Problems (``--problems``): digits logistic regression, MLP and CNN (2C2D) by
default; ``cifar10_3c3d`` / ``cifar10_resnet18`` / ``mnist_*`` from ``--data-dir``.
Optimisers (:mod:`experiments.optimizer_benchmark.optimizers`): SGD (momentum 0.9)
and Adam tuned over learning rates, AdaHessian, SophiaH and Shampoo from
``pytorch-optimizer`` (skipped with a note when it is not installed) tuned the
same way, ``DampedNewton`` with constant damping on a grid of 4 values per decade
(``safeguards=False``: the classic method), and the untuned defaults
``DampedNewton(params)`` with a closure (``newton_default``), without a closure,
without safeguards (the old default), with the independent-sample bootstrap,
without the (default, adaptive) flat-complement step and with a tuned one, and
the session-4 ablations: one Monte-Carlo sample on the whole batch instead of
the exact curvature of 32 samples (``newton_mc1_floor``), the session-3
damping floor (``newton_sub32_lowfloor``) and both (``newton_session3``).

Protocol: every grid value trains on seed ``--seed`` for ``--steps`` steps; the
value with the lowest final training loss (diverged runs last) is the tuned one;
it then trains on ``--seeds`` seeds. Optimisers that are not Newton run
``--first-order-factor`` times as many steps, so that the table can compare both
at equal steps and at equal time (the loss each reaches within the median time
``newton_default`` needs for ``--steps`` steps). The noisy-quadratic family (three
noise models, :mod:`experiments.optimizer_benchmark.quadratic`) runs alongside.

Full mode (default options; on 16 cores ``--workers 15`` takes about ten minutes):
3 digits problems, 5 seeds, 100 steps, fine grids, 100 noisy-quadratic seeds.
Quick mode: logistic regression and MLP, 1 seed, 40 steps, coarse grids, 20
noisy-quadratic seeds.

Writes to ``--out`` (default ``results/optimizer_benchmark``): ``tables/*.csv`` (one
checked table per run, keyed by everything that changes its numbers; valid ones are
reused, so an interrupted benchmark resumes, damaged ones are recomputed),
``tuning.csv``, ``curves.csv``, ``summary.csv``, ``quadratic.csv``,
``quadratic_summary.csv``, ``optimizer_benchmark.png`` and ``environment.json``.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from experiments.common.cli import base_parser, report, setup
from experiments.common.plotting import save
from experiments.common.results import (
    cached_table,
    combine,
    write_environment,
    write_table,
)
from experiments.optimizer_benchmark import plot, quadratic
from experiments.optimizer_benchmark.optimizers import PEERS, peers_available, specs
from experiments.optimizer_benchmark.training import train
from experiments.problems import get_problem
from experiments.problems.noisy_quadratic import NOISE_MODELS

STUDY = "optimizer_benchmark"
DEFAULT_PROBLEMS = ["digits_logreg", "digits_mlp", "digits_2c2d"]


@dataclass(frozen=True)
class Job:
    """One training run (or one noisy-quadratic seed when ``problem`` is a noise)."""

    problem: str
    optimizer: str
    value: float
    seed: int
    steps: int
    eval_every: int
    batch_size: int
    fine: bool

    def key(self) -> dict:
        """Configuration columns and file name of the run's table.

        Everything that changes the run's numbers: ``fine`` only chooses the grid
        (the value is in the key), and the workers train with one thread each.
        """
        return {
            "problem": self.problem, "optimizer": self.optimizer,
            "value": self.value, "seed": self.seed, "steps": self.steps,
            "eval_every": self.eval_every, "batch_size": self.batch_size,
        }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(STUDY, "Untuned damped Newton against tuned optimisers.")
    add = parser.add_argument
    add("--problems", nargs="+", default=None, help="problem names")
    add("--optimizers", nargs="+", default=None, help="optimizer names (default all)")
    add("--seeds", type=int, default=5, help="seeds of the tuned runs")
    add("--steps", type=int, default=100, help="Newton steps (equal-steps budget)")
    add("--eval-every", type=int, default=10)
    add("--batch-size", type=int, default=128)
    add("--first-order-factor", type=int, default=3,
        help="steps of the other optimisers = factor x --steps")  # fmt: skip
    add("--workers", type=int, default=1, help="parallel processes (1 thread each)")
    add("--quadratic-seeds", type=int, default=400)
    add("--quadratic-steps", type=int, default=20)
    add("--skip-quadratic", action="store_true")
    add("--tuned", type=Path, default=None,
        help="tuning.csv of an earlier run with the same --steps, --eval-every, "
             "--batch-size, --first-order-factor and --seed: its chosen values are "
             "reused and those grids not searched again")  # fmt: skip
    args = parser.parse_args(argv)
    args.fine = not args.quick
    if args.quick:
        args.seeds, args.steps, args.eval_every = 1, 40, 10
        args.first_order_factor = min(args.first_order_factor, 3)
        args.quadratic_seeds = min(args.quadratic_seeds, 20)
        args.problems = args.problems or DEFAULT_PROBLEMS[:2]
    args.problems = args.problems or DEFAULT_PROBLEMS
    if args.steps % args.eval_every:
        parser.error("--eval-every must divide --steps")
    if min(args.seeds, args.steps, args.workers, args.first_order_factor) < 1:
        parser.error("--seeds, --steps, --workers, --first-order-factor must be >= 1")
    return args


def optimizer_names(args: argparse.Namespace) -> list[str]:
    names = args.optimizers or list(specs())
    unknown = set(names) - set(specs())
    if unknown:
        raise SystemExit(f"unknown optimizers {sorted(unknown)}; from {list(specs())}")
    if not peers_available():
        skipped = [n for n in names if n in PEERS]
        if skipped:
            print(f"pytorch-optimizer is not installed: skipping {skipped} "
                  "(pip install pytorch-optimizer)")  # fmt: skip
        names = [n for n in names if n not in PEERS]
    return names


def job_steps(args: argparse.Namespace, name: str) -> int:
    newton = specs()[name].kind == "newton"
    return args.steps if newton else args.steps * args.first_order_factor


_DATA: dict[str, object] = {}


def compute(job: Job) -> pd.DataFrame:
    """Run one job (in a worker process)."""
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if job.problem in NOISE_MODELS:
        return quadratic.run_noise_model(job.problem, job.seed, job.steps)
    problem = get_problem(job.problem)
    if job.problem not in _DATA:
        _DATA[job.problem] = problem.load_data(_DATA.get("data_dir"))
    spec = specs(job.fine)[job.optimizer]
    return train(problem, _DATA[job.problem], spec, job.value, job.seed, job.steps,
                 job.eval_every, job.batch_size)  # fmt: skip


class _Missing(Exception):
    pass


def _raise_missing() -> pd.DataFrame:
    raise _Missing


def run_jobs(
    args: argparse.Namespace, jobs: list[Job], desc: str
) -> list[pd.DataFrame]:
    """Tables of ``jobs``: read the present ones, compute the rest in parallel."""
    missing = []
    for job in jobs:
        try:
            cached_table(args.out, job.key(), _raise_missing)
        except _Missing:
            missing.append(job)
    results: dict[Job, pd.DataFrame] = {}
    bar = tqdm(total=len(missing), desc=desc, unit="run", disable=args.no_progress)
    if args.workers > 1 and len(missing) > 1:
        with ProcessPoolExecutor(args.workers, initializer=_init,
                                 initargs=(args.data_dir,)) as pool:  # fmt: skip
            for job, frame in zip(missing, pool.map(compute, missing)):
                results[job] = frame
                cached_table(args.out, job.key(), lambda f=frame: f)
                bar.update()
    else:
        _init(args.data_dir)
        for job in missing:
            frame = compute(job)
            cached_table(args.out, job.key(), lambda f=frame: f)
            bar.update()
    bar.close()
    return [cached_table(args.out, job.key(), _raise_missing) for job in jobs]


def _init(data_dir: str | None) -> None:
    _DATA["data_dir"] = data_dir


def final_rows(table: pd.DataFrame, steps: int) -> pd.DataFrame:
    """The evaluation at ``steps`` (or the last one of a diverged run) per run."""
    keys = ["problem", "optimizer", "value", "seed"]
    upto = table[table["step"] <= steps]
    return upto.loc[upto.groupby(keys)["step"].idxmax()].reset_index(drop=True)


def tune(args, names: list[str]) -> pd.DataFrame:
    """Train every grid value on ``--seed``; return the tuning table.

    With ``--tuned`` the rows of an earlier tuning table are reused for every
    (problem, optimiser) they cover, if they were made with this run's settings.
    """
    reused = _reused_tuning(args, names)
    done = set(zip(reused["problem"], reused["optimizer"]))
    jobs = [
        Job(problem, name, value, args.seed, job_steps(args, name), args.eval_every,
            args.batch_size, args.fine)
        for problem in args.problems for name in names
        if (problem, name) not in done
        for value in specs(args.fine)[name].grid
    ]  # fmt: skip
    tables = run_jobs(args, jobs, "tuning")
    if tables:
        tuning = final_rows(pd.concat(tables, ignore_index=True), args.steps)
        tuning["score"] = tuning["train_loss"].where(
            ~tuning["diverged"].astype(bool), math.inf
        )
        reused = pd.concat([reused, tuning], ignore_index=True)
    return reused


def _reused_tuning(args, names: list[str]) -> pd.DataFrame:
    """Rows of ``--tuned`` for this run's problems and optimisers (may be empty).

    Raises:
        SystemExit: If the file is missing, lacks columns or was made with other
            settings (steps, evaluation interval, batch size, seed).
    """
    columns = ["problem", "optimizer", "value", "seed", "steps", "eval_every",
               "batch_size", "step", "diverged", "score"]  # fmt: skip
    if args.tuned is None:
        return pd.DataFrame(columns=columns)
    try:
        table = pd.read_csv(args.tuned)
    except OSError as err:
        raise SystemExit(f"--tuned: cannot read {args.tuned}: {err}") from err
    missing = set(columns) - set(table.columns)
    if missing:
        raise SystemExit(f"--tuned: {args.tuned} lacks columns {sorted(missing)}; "
                         "pass the tuning.csv of an earlier run.")  # fmt: skip
    table = table[table["problem"].isin(args.problems)
                  & table["optimizer"].isin(names)].copy()  # fmt: skip
    for name, part in table.groupby("optimizer"):
        expected = {"seed": args.seed, "eval_every": args.eval_every,
                    "batch_size": args.batch_size,
                    "steps": job_steps(args, name)}  # fmt: skip
        for key, value in expected.items():
            if not (part[key] == value).all():
                raise SystemExit(
                    f"--tuned: {args.tuned} tuned {name} with other {key} "
                    f"({sorted(set(part[key]))}, this run {value}); rerun the grid "
                    "without --tuned."
                )
    table["diverged"] = table["diverged"].astype(bool)
    return table


def best_values(tuning: pd.DataFrame) -> dict[tuple[str, str], float]:
    best = tuning.loc[tuning.groupby(["problem", "optimizer"])["score"].idxmin()]
    return {(r.problem, r.optimizer): r.value for r in best.itertuples()}


def summarize(curves: pd.DataFrame, steps: int, tuning: pd.DataFrame) -> pd.DataFrame:
    """Per problem and optimiser: equal-steps and equal-time results over seeds."""
    final = final_rows(curves, steps)
    final["time_per_step_ms"] = 1e3 * final["time_s"] / final["step"].clip(lower=1)
    rows = []
    order = list(dict.fromkeys(zip(curves["problem"], curves["optimizer"])))
    for problem, name in order:
        part = final[(final["problem"] == problem) & (final["optimizer"] == name)]
        ours = final[(final["problem"] == problem)
                     & (final["optimizer"] == "newton_default")]  # fmt: skip
        budget = ours["time_s"].median()
        runs = curves[(curves["problem"] == problem) & (curves["optimizer"] == name)]
        at_time = runs[runs["time_s"] <= budget].groupby("seed")["train_loss"].last()
        grid = tuning[(tuning["problem"] == problem) & (tuning["optimizer"] == name)]
        rows.append({
            "problem": problem, "optimizer": name, "value": part["value"].iloc[0],
            "grid_size": len(grid),
            "grid_divergences": int(grid["diverged"].astype(bool).sum()),
            "train_loss": part["train_loss"].median(),
            "train_loss_min": part["train_loss"].min(),
            "train_loss_max": part["train_loss"].max(),
            "test_accuracy": part["test_accuracy"].median(),
            "divergences": int(part["diverged"].astype(bool).sum()),
            "seeds": len(part),
            "time_per_step_ms": part["time_per_step_ms"].median(),
            "train_loss_equal_time": at_time.median() if len(at_time) else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def verdict(summary: pd.DataFrame) -> str:
    """The issue's targets, checked on the digits problems."""
    lines = []
    for problem, part in summary.groupby("problem", sort=False):
        loss = part.set_index("optimizer")["train_loss"]
        if "newton_default" not in loss:
            continue
        ours = loss["newton_default"]
        better = [n for n in loss.index if n != "newton_default" and loss[n] < ours]
        lines.append(f"{problem}: newton_default {ours:.4g}; lower at equal steps: "
                     f"{better or 'none'}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    setup(args)
    write_environment(args.out, vars(args))
    names = optimizer_names(args)
    tuning = tune(args, names)
    combine([tuning], args.out / "tuning.csv")
    best = best_values(tuning)
    jobs = [
        Job(problem, name, best[(problem, name)], args.seed + offset,
            job_steps(args, name), args.eval_every, args.batch_size, args.fine)
        for problem in args.problems for name in names
        for offset in range(args.seeds)
    ]  # fmt: skip
    curves = combine(run_jobs(args, jobs, "tuned runs"), args.out / "curves.csv")
    summary = summarize(curves, args.steps, tuning)
    write_table(summary, args.out / "summary.csv")
    figures = [save(plot.figure(curves), args.out / f"{STUDY}.png")]
    columns = ["problem", "optimizer", "value", "train_loss", "test_accuracy",
               "divergences", "time_per_step_ms", "train_loss_equal_time"]  # fmt: skip
    print(summary[columns].to_string(index=False, float_format="%.4g"))
    print(verdict(summary))
    if not args.skip_quadratic:
        nq_jobs = [
            Job(noise, "all", 0.0, seed, args.quadratic_steps, 1, 128, args.fine)
            for noise in NOISE_MODELS for seed in range(args.quadratic_seeds)
        ]  # fmt: skip
        runs = combine(run_jobs(args, nq_jobs, "noisy quadratic"),
                       args.out / "quadratic.csv")  # fmt: skip
        runs = runs.rename(columns={"problem": "noise"})
        nq = quadratic.summarize(runs)
        write_table(nq, args.out / "quadratic_summary.csv")
        print(nq.to_string(index=False, float_format="%.3g"))
    report(STUDY, args.out / "summary.csv", figures)
    return summary


if __name__ == "__main__":
    main()
