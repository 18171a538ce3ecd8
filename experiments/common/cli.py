"""Command-line pieces shared by the studies' ``run.py`` entry points."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch


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
    parser.add_argument(
        "--problem", default=problem, help="problem name, see experiments.problems"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with torchvision MNIST/FMNIST/CIFAR-10 files (no download)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results") / study, help="output folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--quick", action="store_true", help="short version (minutes on a laptop)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def setup(args: argparse.Namespace) -> None:
    """Apply the shared options (threads, warning filters) before a study starts."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def parse_steps(text: str) -> list[int]:
    """Parse a comma-separated list of steps like ``'0,50,400'``."""
    return sorted({int(part) for part in text.split(",") if part.strip()})


def report(study: str, table: Path, figures: list[Path]) -> None:
    """Print where a study's table and figures went."""
    print(f"[{study}] table:  {table}")
    for figure in figures:
        print(f"[{study}] figure: {figure}")
