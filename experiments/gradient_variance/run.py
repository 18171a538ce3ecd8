"""Study 7: gradient and curvature variance during training.

Trains with SGD and Adam and, at log-spaced checkpoints, measures on several fixed
batches of training data the per-sample gradient variance (trace of the gradient
covariance, against the squared mean gradient) and, along the GGN's top directions,
the variance of the per-sample curvatures λ_nk.
Run with ``python -m experiments.gradient_variance.run``.
"""

from __future__ import annotations

from functools import partial

from experiments.common import cli
from experiments.common.study import default_steps
from experiments.gradient_variance.compute import variance_table
from experiments.gradient_variance.plot import plot_variance
from experiments.problems import get_problem

STUDY = "gradient_variance"


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its table and figures."""
    parser = cli.base_parser(STUDY, __doc__)
    cli.add_training_args(parser, eval_batch=64)
    parser.add_argument("--num-batches", type=int, default=4, help="batches per step")
    parser.add_argument("--top-k", type=int, default=20, help="directions reported")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 10 if args.epochs is None else args.epochs
        args.num_batches = min(args.num_batches, 2)
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    size = args.eval_batch_size
    batches = [
        (
            data.train_x[i * size : (i + 1) * size],
            data.train_y[i * size : (i + 1) * size],
        )
        for i in range(args.num_batches)
    ]
    evaluate = partial(_evaluate, batches=batches, top_k=args.top_k)
    table = cli.train_and_tabulate(
        args, problem, data, STUDY, lambda run: evaluate,
        default=lambda num_steps: default_steps(num_steps, 6),
    )  # fmt: skip
    figures = plot_variance(table, args.out)
    cli.report(STUDY, args.out / f"{STUDY}.csv", figures)
    return {"table": args.out / f"{STUDY}.csv", "figures": figures}


def _evaluate(model, loss_fn, step, *, batches, top_k):
    return variance_table(model, loss_fn, batches, top_k)


if __name__ == "__main__":
    main()
