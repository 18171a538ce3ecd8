"""Study 2: GGN spectrum under approximations (exact, sub-sampled, Monte Carlo).

On a fixed held-out batch at checkpoints of an SGD run, compares the exact GGN
spectrum with curvature sub-sampling (a random 1/8 of the samples) and a one-sample
Monte-Carlo factor, each over ``--draws`` random draws: histograms with the median
and 10-90 % band over the draws, and the distance, λ_max ratio and trace ratio to
exact per draw and summarised (median, quantiles, extremes). The tables and their
columns are described in :mod:`experiments.spectrum_approximations.compute`.
Run with ``python -m experiments.spectrum_approximations.run``.
"""

from __future__ import annotations

from functools import partial

from experiments.common import cli
from experiments.common.results import combine
from experiments.problems import get_problem
from experiments.spectrum_approximations.compute import distances, spectra_table, spread
from experiments.spectrum_approximations.plot import plot_spectra

STUDY = "spectrum_approximations"
GROUP = ["problem", "optimizer", "step"]


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its tables and figures."""
    parser = cli.base_parser(STUDY, __doc__, problem="digits_2c2d")
    cli.add_training_args(parser, optimizers="sgd")
    add = parser.add_argument
    add("--fraction", type=int, default=8, help="sub-sampling 1/fraction")
    add("--draws", type=int, default=10, help="draws of each random approximation")
    args = parser.parse_args(argv)
    if args.quick and args.epochs is None:
        args.epochs = 5
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    inputs, labels = cli.held_out_batch(args, data)
    evaluate = partial(_evaluate, inputs=inputs, labels=labels, args=args)
    table = cli.train_and_tabulate(args, problem, data, STUDY, lambda run: evaluate)
    draws = combine([distances(table, GROUP)], args.out / f"{STUDY}_draws.csv")
    summary = combine([spread(draws, GROUP)], args.out / f"{STUDY}_distances.csv")
    columns = ["trace_ratio", "top_ratio", "wasserstein_log10"]
    shown = [f"{c}_{s}" for c in columns for s in ("median", "min", "max")]
    print(summary[[*GROUP, "method", *shown]].to_string(index=False))
    figures = plot_spectra(table, summary, args.out)
    cli.report(STUDY, args.out / f"{STUDY}_distances.csv", figures)
    return {
        "table": args.out / f"{STUDY}.csv",
        "draws": args.out / f"{STUDY}_draws.csv",
        "distances": args.out / f"{STUDY}_distances.csv",
        "figures": figures,
    }


def _evaluate(model, loss_fn, step, *, inputs, labels, args):
    return spectra_table(
        model, loss_fn, inputs, labels, args.fraction, args.draws, args.seed + step
    )


if __name__ == "__main__":
    main()
