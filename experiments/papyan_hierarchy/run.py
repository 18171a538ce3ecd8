"""Study 4: Papyan's hierarchy. Run ``python -m experiments.papyan_hierarchy.run``.

At checkpoints of an SGD run: (1) on a fixed held-out batch, the exact nonzero
spectra of the GGN and of its class-mean (A1, A2) and within-class (B1, B2) parts
from contractions of the Gram matrix; (2) on (a subset of) the training data, the
Hessian, GGN and residual spectra via the Lanczos fallback with top-C deflation
(``--full-data-samples 0`` skips this part).
"""

from __future__ import annotations

from functools import partial

from experiments.common import cli
from experiments.common.results import combine, write_environment
from experiments.common.study import evaluate_checkpoints, train_run
from experiments.papyan_hierarchy.compute import batch_hierarchy_table, summarize
from experiments.papyan_hierarchy.full_data import data_batches, full_data_table
from experiments.papyan_hierarchy.plot import plot_batch_hierarchy, plot_full_data
from experiments.problems import get_problem

STUDY = "papyan_hierarchy"


def parse_args(argv: list[str] | None = None):
    """Parse the command line (see ``--help``)."""
    parser = cli.base_parser(STUDY, __doc__)
    cli.add_training_args(parser, optimizers="sgd")
    add = parser.add_argument
    add("--full-data-samples", type=int, default=1437, help="0 skips the Lanczos part")
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
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    inputs, labels = cli.held_out_batch(args, data)
    write_environment(args.out, vars(args))
    (run,) = cli.make_runs(args, problem, data)[:1]
    steps = cli.eval_steps(args, run.train_config.num_steps)
    train_run(run, steps, progress=not args.no_progress)
    batch = evaluate_checkpoints(
        run, steps, partial(_batch, inputs=inputs, labels=labels), "batch"
    )
    table = combine([batch], args.out / f"{STUDY}.csv")
    group = ["problem", "step"]
    combine([summarize(table, group)], args.out / f"{STUDY}_summary.csv")
    figures = plot_batch_hierarchy(table, args.out)
    result = {"table": args.out / f"{STUDY}.csv", "figures": figures}
    if args.full_data_samples > 0:
        full = evaluate_checkpoints(
            run, steps, partial(_full, run=run, args=args), "full_data"
        )
        result["full_data"] = args.out / f"{STUDY}_full_data.csv"
        figures += plot_full_data(combine([full], result["full_data"]), args.out)
    cli.report(STUDY, result["table"], figures)
    return result


def _batch(model, loss_fn, step, *, inputs, labels):
    return batch_hierarchy_table(model, loss_fn, inputs, labels)


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
