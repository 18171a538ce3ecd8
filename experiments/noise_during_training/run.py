"""Study 1: noise during training. ``python -m experiments.noise_during_training.run``.

Trains a problem with SGD and Adam, checkpointing at initialisation, early and late in
training, and evaluates on a fixed held-out test batch the GGN's nontrivial directions:
λ_k against |γ_k|, gradient overlaps grouped by curvature and with the flat space,
SNR of λ_k and γ_k, and the number K of nontrivial directions. ``--quick`` runs a
short version on the offline digits in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from functools import partial

from experiments.common import cli
from experiments.noise_during_training.compute import noise_table
from experiments.noise_during_training.plot import plot_noise
from experiments.problems import get_problem

STUDY = "noise_during_training"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    parser = cli.base_parser(STUDY, __doc__)
    cli.add_training_args(parser)
    args = parser.parse_args(argv)
    if args.quick and args.epochs is None:
        args.epochs = 10
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its table and figures."""
    args = parse_args(argv)
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    inputs, labels = (
        data.test_x[: args.eval_batch_size],
        data.test_y[: args.eval_batch_size],
    )
    evaluate = partial(_evaluate, inputs=inputs, labels=labels)
    table = cli.train_and_tabulate(args, problem, data, STUDY, lambda run: evaluate)
    figures = plot_noise(table, args.out)
    cli.report(STUDY, args.out / f"{STUDY}.csv", figures)
    return {"table": args.out / f"{STUDY}.csv", "figures": figures}


def _evaluate(model, loss_fn, step, *, inputs, labels):
    return noise_table(model, loss_fn, inputs, labels)


if __name__ == "__main__":
    main()
