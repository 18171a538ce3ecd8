"""Study 5: GGN diagonal vs spectrum (Deep Curvature suite).

At checkpoints of an SGD run, on a held-out batch: the histogram of BackPACK's MC
(and exact) GGN diagonal against the exact GGN spectrum (Gram matrix) and the
Lanczos spectral density, and a summary of where the diagonal misleads (largest
value, number of large entries) although its trace is exact; the MC diagonal over
``--draws`` draws (median and spread). Tables and columns:
:mod:`experiments.diagonal_vs_spectrum.compute`.
Run with ``python -m experiments.diagonal_vs_spectrum.run``.
"""

from __future__ import annotations

import importlib.util
from functools import partial

from experiments.common import cli
from experiments.common.results import combine
from experiments.diagonal_vs_spectrum.compute import diagonal_table, summarize
from experiments.diagonal_vs_spectrum.plot import plot_diagonal
from experiments.problems import get_problem

STUDY = "diagonal_vs_spectrum"


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its tables and figures."""
    parser = cli.base_parser(STUDY, __doc__)
    cli.add_training_args(parser, optimizers="sgd")
    add = parser.add_argument
    add("--lanczos-iters", type=int, default=60, help="0 skips the Lanczos density")
    add("--lanczos-probes", type=int, default=10, help="SLQ probes")
    add("--draws", type=int, default=10, help="MC diagonal draws")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 10 if args.epochs is None else args.epochs
    if importlib.util.find_spec("vivitlib.hessianfree.density") is None:
        args.lanczos_iters = 0
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    inputs, labels = cli.held_out_batch(args, data)
    evaluate = partial(_evaluate, inputs=inputs, labels=labels, args=args)
    table = cli.train_and_tabulate(
        args, problem, data, STUDY, lambda run: partial(evaluate, run=run)
    )
    summary = combine(
        [summarize(table, ["problem", "step"])], args.out / f"{STUDY}_summary.csv"
    )
    shown = [f"{q}_{s}" for q in ("trace", "largest") for s in ("median", "min", "max")]
    print(summary[["problem", "step", "kind", *shown]].to_string(index=False))
    figures = plot_diagonal(table, args.out)
    cli.report(STUDY, args.out / f"{STUDY}_summary.csv", figures)
    return {"table": args.out / f"{STUDY}.csv", "figures": figures}


def _evaluate(model, loss_fn, step, *, inputs, labels, run, args):
    plain = run.plain_model(model) if args.lanczos_iters > 0 else None
    return diagonal_table(
        model,
        loss_fn,
        plain,
        inputs,
        labels,
        num_iters=args.lanczos_iters,
        num_probes=args.lanczos_probes,
        seed=args.seed + step,
        num_draws=args.draws,
    )


if __name__ == "__main__":
    main()
