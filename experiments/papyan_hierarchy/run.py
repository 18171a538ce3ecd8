"""Study 4: Papyan's hierarchy. Run ``python -m experiments.papyan_hierarchy.run``.

At checkpoints of an SGD run (initialisation, early, end), for each problem of
``--problem`` (comma-separated; default the two digits networks; ``cifar10_3c3d``
with ``--data-dir``): (1) on a fixed training batch and a fixed held-out batch of the
same size, the exact nonzero spectra (float64) of the GGN, of its class-mean (A1, A2)
and within-class (B1, B2) parts, and of ``G`` minus each part, with the outlier
eigenvalues of each, a test of Papyan's attribution of the ``C`` outliers to the class
means (printed plainly), and the Gram matrix of the class means; (2) on (a subset
of) the training data, the Hessian, GGN and residual spectra via the Lanczos fallback
with top-C deflation (``--full-data-samples 0`` skips this part; by default only
for the first problem, ``--full-data-problems`` names others). The tables and
their columns are described in :mod:`experiments.papyan_hierarchy.compute`.

With CIFAR-10 on disk: ``python -m experiments.papyan_hierarchy.run --problem
digits_mlp,digits_2c2d,cifar10_3c3d --data-dir DIR`` (the Lanczos part stays on the
first problem unless ``--full-data-problems`` names more).
"""

from __future__ import annotations

from functools import partial

from experiments.common import cli
from experiments.common.results import combine, write_environment
from experiments.common.study import evaluate_checkpoints, train_run
from experiments.papyan_hierarchy.compute import (
    attribution,
    batch_hierarchy_table,
    class_mean_table,
    summarize,
    verdict,
)
from experiments.papyan_hierarchy.full_data import data_batches, full_data_table
from experiments.papyan_hierarchy.plot import (
    plot_batch_hierarchy,
    plot_class_means,
    plot_full_data,
)
from experiments.problems import get_problem

STUDY = "papyan_hierarchy"
GROUP = ["problem", "split", "step"]


def parse_args(argv: list[str] | None = None):
    """Parse the command line (see ``--help``)."""
    parser = cli.base_parser(STUDY, __doc__, problem="digits_mlp,digits_2c2d")
    cli.add_training_args(parser, optimizers="sgd")
    add = parser.add_argument
    add("--full-data-samples", type=int, default=1437, help="0 skips the Lanczos part")
    add(
        "--full-data-problems",
        default=None,
        help="comma-separated problems of the Lanczos part; default: the first",
    )
    add("--lanczos-iters", type=int, default=60, help="Lanczos steps per probe")
    add("--lanczos-probes", type=int, default=5, help="SLQ probes")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 5 if args.epochs is None else args.epochs
        args.full_data_samples = min(args.full_data_samples, 512)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its tables and figures."""
    args = parse_args(argv)
    cli.setup(args)
    write_environment(args.out, vars(args))
    batches, means, fulls = [], [], []
    names = args.problem.split(",")
    full_names = (args.full_data_problems or names[0]).split(",")
    for name in names:
        problem = get_problem(name)
        data = problem.load_data(args.data_dir)
        size = args.eval_batch_size
        splits = {
            "train": (data.train_x[:size], data.train_y[:size]),
            "test": cli.held_out_batch(args, data),
        }
        (run,) = cli.make_runs(args, problem, data)[:1]
        steps = cli.eval_steps(args, run.train_config.num_steps)
        train_run(run, steps, progress=not args.no_progress)
        batches.append(
            evaluate_checkpoints(run, steps, partial(_batch, splits=splits), "batch")
        )
        means.append(
            evaluate_checkpoints(
                run, steps, partial(_means, splits=splits), "class_means"
            )
        )
        if args.full_data_samples > 0 and name in full_names:
            fulls.append(
                evaluate_checkpoints(
                    run, steps, partial(_full, run=run, args=args), "full_data"
                )
            )
    table = combine(batches, args.out / f"{STUDY}.csv")
    summary = combine([summarize(table, GROUP)], args.out / f"{STUDY}_summary.csv")
    verdicts = combine(
        [attribution(summary, GROUP)], args.out / f"{STUDY}_attribution.csv"
    )
    class_means = combine(means, args.out / f"{STUDY}_class_means.csv")
    print(verdict(verdicts))
    figures = plot_batch_hierarchy(table, summary, args.out)
    figures += plot_class_means(class_means, args.out)
    result = {
        "table": args.out / f"{STUDY}.csv",
        "summary": args.out / f"{STUDY}_summary.csv",
        "attribution": args.out / f"{STUDY}_attribution.csv",
        "class_means": args.out / f"{STUDY}_class_means.csv",
        "figures": figures,
    }
    if fulls:
        result["full_data"] = args.out / f"{STUDY}_full_data.csv"
        figures += plot_full_data(combine(fulls, result["full_data"]), args.out)
    cli.report(STUDY, result["table"], figures)
    return result


def _batch(model, loss_fn, step, *, splits):
    return batch_hierarchy_table(model, loss_fn, splits)


def _means(model, loss_fn, step, *, splits):
    return class_mean_table(model, loss_fn, splits)


def _full(model, loss_fn, step, *, run, args):
    plain = run.plain_model(model)
    count = args.full_data_samples
    batches = data_batches(run.data.train_x[:count], run.data.train_y[:count], 512)
    return full_data_table(
        plain,
        run.problem.make_loss(),
        batches,
        run.data.num_classes,
        num_iters=args.lanczos_iters,
        num_probes=args.lanczos_probes,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
