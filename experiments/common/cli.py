"""Command-line pieces shared by the studies' ``run.py`` entry points."""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from experiments.common.optimizers import FIRST_ORDER
from experiments.common.results import combine, number_options, write_environment
from experiments.common.resumable import TrainConfig
from experiments.common.study import (
    TRAINING_OPTIONS,
    Evaluator,
    Run,
    default_steps,
    train_and_evaluate,
)
from experiments.common.training import HOOK_WARNING
from experiments.problems import ImageData, Problem, training_defaults


def base_parser(study: str, description: str, problem: str = "digits_mlp"):
    """Build an argument parser with the options every study shares.

    Args:
        study: The study's folder name; results default to ``results/<study>``.
        description: Shown by ``--help``.
        problem: Default problem name. Default: ``'digits_mlp'``.

    Returns:
        The parser with ``--problem``, ``--data-dir``, ``--out``, ``--seed``,
        ``--threads``, ``--quick`` and ``--no-progress``.

    """
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{study}.run",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--problem", default=problem, help="problem name, see experiments.problems")
    add("--data-dir", default=None, help="folder of torchvision files (no download)")
    add("--out", type=Path, default=Path("results") / study, help="output folder")
    add("--seed", type=int, default=0, help="random seed")
    add("--threads", type=int, default=None, help="torch CPU threads")
    add("--quick", action="store_true", help="short version (minutes on 2 cores)")
    add("--no-progress", action="store_true", help="hide progress bars")
    return parser


def add_training_args(
    parser: argparse.ArgumentParser, optimizers: str = "sgd,adam", eval_batch: int = 128
) -> None:
    """Add the options of studies that train: optimizers, epochs, steps, batches."""
    add = parser.add_argument
    add("--optimizers", default=optimizers, help=f"comma-separated, from {FIRST_ORDER}")
    add("--epochs", type=float, default=None, help="default: the problem's")
    add("--batch-size", type=int, default=None, help="default: the problem's")
    add("--lr-sgd", type=float, default=None, help="default: the problem's")
    add("--lr-adam", type=float, default=None, help="default: the problem's")
    add("--steps", default=None, help="checkpoint steps, e.g. '0,20,400'")
    add("--eval-batch-size", type=int, default=eval_batch, help="held-out batch size")


def setup(args: argparse.Namespace) -> None:
    """Apply the shared options (threads, warning filters) before a study starts."""
    warnings.filterwarnings("ignore", message=HOOK_WARNING)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)


def parse_steps(text: str) -> list[int]:
    """Parse a comma-separated list of steps like ``'0,50,400'``.

    Raises:
        ValueError: If an entry is not a non-negative integer or none is given.

    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ValueError(
            f"--steps must be comma-separated non-negative integers like '0,20,400', "
            f"got {text!r}."
        )
    return sorted({int(part) for part in parts})


def eval_steps(
    args: argparse.Namespace,
    num_steps: int,
    default: Callable[[int], list[int]] = default_steps,
) -> list[int]:
    """Return ``--steps`` if given, else ``default(num_steps)`` (init, early, final)."""
    return parse_steps(args.steps) if args.steps else default(num_steps)


def train_and_tabulate(
    args: argparse.Namespace,
    problem: Problem,
    data: ImageData,
    study: str,
    evaluator_for: Callable[[Run], Evaluator],
    default: Callable[[int], list[int]] = default_steps,
) -> pd.DataFrame:
    """Train every run of a study, evaluate its checkpoints, write ``<study>.csv``.

    Args:
        args: Parsed command line (``--out``, ``--steps``, ``--no-progress``, ...).
        problem: The problem.
        data: Its data.
        study: Study name (table file name and progress label).
        evaluator_for: Returns the checkpoint evaluator of a run.
        default: Evaluation steps when ``--steps`` is not given.

    Returns:
        The combined table of every run and evaluated step.

    Every option but :data:`~experiments.common.results.NON_NUMERIC_OPTIONS` and
    :data:`~experiments.common.study.TRAINING_OPTIONS` (whose effect the tables'
    run and step columns already record) keys the cached evaluation tables, so a
    changed option (e.g. ``--eval-batch-size``) computes new tables.
    """
    write_environment(args.out, vars(args))
    options = number_options(vars(args), exclude=TRAINING_OPTIONS)
    frames = []
    for run in make_runs(args, problem, data):
        steps = eval_steps(args, run.train_config.num_steps, default)
        evaluate = evaluator_for(run)
        progress = not args.no_progress
        frames.append(
            train_and_evaluate(run, steps, evaluate, study, progress, options)
        )
    return combine(frames, args.out / f"{study}.csv")


def held_out_batch(args: argparse.Namespace, data: ImageData):
    """Return the fixed held-out batch: the first ``--eval-batch-size`` test samples.

    Raises:
        ValueError: If ``--eval-batch-size`` is not between 1 and the test set size.

    """
    size, available = args.eval_batch_size, len(data.test_y)
    if not 1 <= size <= available:
        raise ValueError(
            f"--eval-batch-size must be between 1 and the {available} test samples "
            f"of {data.name!r}, got {size}."
        )
    return data.test_x[:size], data.test_y[:size]


def make_runs(args: argparse.Namespace, problem: Problem, data: ImageData) -> list[Run]:
    """Build one :class:`Run` per optimizer from the training options.

    Args:
        args: Parsed arguments including those of :func:`add_training_args`.
        problem: The problem.
        data: Its data.

    Returns:
        The runs, in the order of ``--optimizers``.

    Raises:
        ValueError: If an option is out of range or names an unknown optimizer.

    """
    defaults = training_defaults(problem.name)
    batch_size = _given(args.batch_size, defaults.batch_size)
    epochs = _given(args.epochs, defaults.epochs)
    if not 1 <= batch_size <= len(data.train_y):
        raise ValueError(
            f"--batch-size must be between 1 and the {len(data.train_y)} training "
            f"samples, got {batch_size}."
        )
    if not math.isfinite(epochs) or epochs < 0:
        raise ValueError(f"--epochs must be a finite number >= 0, got {epochs}.")
    num_steps = int(epochs * (len(data.train_y) // batch_size))
    lrs = {
        "sgd": _given(args.lr_sgd, defaults.sgd_lr),
        "adam": _given(args.lr_adam, defaults.adam_lr),
    }
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    if not names or set(names) - set(lrs):
        raise ValueError(
            f"--optimizers must be comma-separated names from {FIRST_ORDER}, got "
            f"{args.optimizers!r}."
        )
    runs = []
    for name in names:
        config = TrainConfig(name, lrs[name], batch_size, num_steps, seed=args.seed)
        runs.append(Run(problem, data, config, args.out))
    return runs


def _given(value, default):
    """``value`` unless the option was not given (``None``; ``0`` is a value)."""
    return default if value is None else value


def report(study: str, table: Path, figures: list[Path]) -> None:
    """Print where a study's table and figures went."""
    print(f"[{study}] table:  {table}")
    for figure in figures:
        print(f"[{study}] figure: {figure}")
