"""Study 1: noise during training. ``python -m experiments.noise_during_training.run``.

Trains a problem with SGD and Adam, checkpointing at initialisation, early and late in
training, and evaluates on a fixed held-out test batch the GGN's directions: λ_k
against |γ_k|, gradient overlaps grouped by curvature, SNR of λ_k and γ_k. The pass
runs in float64 (``--precision``), and counts are reported at fixed fractions of
``λ_max`` (1e-2, 1e-4, 1e-6), since the number of "nontrivial" eigenvalues is a
round-off threshold. ``--quick`` runs a short version on the offline digits in a few
minutes on 2 CPU cores.

Outputs in ``--out``: ``noise_during_training.csv`` (one row per direction, columns in
:mod:`experiments.noise_during_training.compute`), ``noise_during_training_summary.csv``
(one row per checkpoint, columns in :mod:`experiments.common.spectrum`),
one figure per optimizer; a short summary per checkpoint is printed.
"""

from __future__ import annotations

import argparse
from functools import partial

from experiments.common import cli
from experiments.common.curvature import PRECISIONS
from experiments.common.results import combine
from experiments.noise_during_training.compute import noise_table
from experiments.noise_during_training.plot import plot_noise
from experiments.noise_during_training.summary import format_summary, summarize
from experiments.problems import get_problem

STUDY = "noise_during_training"
GROUP = ["problem", "optimizer", "step"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    parser = cli.base_parser(STUDY, __doc__)
    cli.add_training_args(parser)
    parser.add_argument(
        "--precision",
        default="float64",
        choices=sorted(PRECISIONS),
        help="precision of the curvature pass",
    )
    args = parser.parse_args(argv)
    if args.quick and args.epochs is None:
        args.epochs = 10
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its tables and figures."""
    args = parse_args(argv)
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    inputs, labels = cli.held_out_batch(args, data)
    evaluate = partial(
        _evaluate, inputs=inputs, labels=labels, precision=args.precision
    )
    table = cli.train_and_tabulate(args, problem, data, STUDY, lambda run: evaluate)
    summary_path = args.out / f"{STUDY}_summary.csv"
    summary = combine([summarize(table, GROUP)], summary_path)
    print(format_summary(summary, GROUP))
    figures = plot_noise(table, args.out)
    cli.report(STUDY, args.out / f"{STUDY}.csv", figures)
    print(f"[{STUDY}] summary: {summary_path}")
    return {"table": args.out / f"{STUDY}.csv", "summary": summary_path,
            "figures": figures}  # fmt: skip


def _evaluate(model, loss_fn, step, *, inputs, labels, precision):
    return noise_table(model, loss_fn, inputs, labels, precision)


if __name__ == "__main__":
    main()
