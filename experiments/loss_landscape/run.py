"""Study 6: loss landscape along the top GGN eigenvectors vs random directions.

At checkpoints of an SGD run, the GGN's two leading eigenvectors on a held-out batch
span a plane; the training (subset) and test loss are evaluated on a grid in that
plane and in a random plane: 1-D and 2-D slices, with the quadratic model along
``e_1``. Run with ``python -m experiments.loss_landscape.run``.
"""

from __future__ import annotations

from functools import partial

from experiments.common import cli
from experiments.loss_landscape.compute import landscape_table
from experiments.loss_landscape.plot import plot_landscape
from experiments.problems import get_problem

STUDY = "loss_landscape"


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its table and figures."""
    parser = cli.base_parser(STUDY, __doc__)
    cli.add_training_args(parser, optimizers="sgd")
    add = parser.add_argument
    add("--radius", type=float, default=1.0, help="grid half-width (unit directions)")
    add("--num-points", type=int, default=21, help="grid points per axis (odd)")
    add("--train-samples", type=int, default=1024, help="training subset on the grid")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 10 if args.epochs is None else args.epochs
        args.num_points = min(args.num_points, 11)
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    splits = {
        "train": (
            data.train_x[: args.train_samples],
            data.train_y[: args.train_samples],
        ),
        "test": data.split("test"),
    }
    evaluate = partial(
        _evaluate, batch=cli.held_out_batch(args, data), splits=splits, args=args
    )
    table = cli.train_and_tabulate(
        args, problem, data, STUDY, lambda run: evaluate,
        default=lambda num_steps: [0, num_steps],
    )  # fmt: skip
    figures = plot_landscape(table, args.out)
    cli.report(STUDY, args.out / f"{STUDY}.csv", figures)
    return {"table": args.out / f"{STUDY}.csv", "figures": figures}


def _evaluate(model, loss_fn, step, *, batch, splits, args):
    return landscape_table(
        model, loss_fn, batch, splits, args.radius, args.num_points, args.seed + step
    )


if __name__ == "__main__":
    main()
