"""Study 7: gradient and curvature variance, and Hessian norms, during training.

Trains with SGD and Adam and, at log-spaced checkpoints, measures on several fixed
batches of training data (float64): the per-sample gradient variance (trace of the
gradient covariance, against the squared mean gradient), the variance of the
per-sample GGNs and of the per-sample curvatures λ_nk along the top directions, the
share of directions with curvature SNR > 1 above fixed fractions of λ_max, and the
batch Hessian's largest eigenvalue, trace and Frobenius norm and the variance of the
per-sample Hessians (Deep Curvature suite; the spread over the batches is the
Hessian's batch-to-batch variance; ``--probes 0`` skips them). Columns:
:mod:`experiments.gradient_variance.compute`.
Run with ``python -m experiments.gradient_variance.run``.
"""

from __future__ import annotations

from functools import partial

from experiments.common import cli
from experiments.common.curvature import PRECISIONS
from experiments.common.study import default_steps
from experiments.gradient_variance.compute import variance_table
from experiments.gradient_variance.plot import plot_variance
from experiments.problems import get_problem

STUDY = "gradient_variance"


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its table and figures."""
    parser = cli.base_parser(STUDY, __doc__)
    cli.add_training_args(parser, eval_batch=64)
    add = parser.add_argument
    add("--num-batches", type=int, default=4, help="batches per step")
    add("--top-k", type=int, default=20, help="directions reported")
    add("--probes", type=int, default=20, help="Hutchinson probes (0: no Hessian)")
    add("--precision", default="float64", choices=sorted(PRECISIONS))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 10 if args.epochs is None else args.epochs
        args.num_batches = min(args.num_batches, 2)
        args.probes = min(args.probes, 8)
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
    evaluate = partial(_evaluate, batches=batches, args=args)
    table = cli.train_and_tabulate(
        args, problem, data, STUDY, lambda run: partial(evaluate, run=run),
        default=lambda num_steps: default_steps(num_steps, 6),
    )  # fmt: skip
    figures = plot_variance(table, args.out)
    cli.report(STUDY, args.out / f"{STUDY}.csv", figures)
    return {"table": args.out / f"{STUDY}.csv", "figures": figures}


def _evaluate(model, loss_fn, step, *, batches, args, run):
    plain = run.plain_model(model) if args.probes > 0 else None
    return variance_table(
        model,
        loss_fn,
        batches,
        args.top_k,
        plain=plain,
        plain_loss=run.problem.make_loss(),
        num_probes=args.probes,
        precision=args.precision,
        seed=args.seed + step,
    )


if __name__ == "__main__":
    main()
