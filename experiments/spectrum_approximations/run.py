"""Study 2: GGN spectrum under approximations (exact, sub-sampled, Monte Carlo).

On a fixed held-out batch at checkpoints of an SGD run, compares the exact GGN
spectrum with curvature sub-sampling (1/8 of the samples) and a one-sample
Monte-Carlo factor: histograms on one figure and distances between the spectra.
Run with ``python -m experiments.spectrum_approximations.run``.
"""

from __future__ import annotations

from functools import partial

from experiments.common import cli
from experiments.common.results import combine
from experiments.problems import get_problem
from experiments.spectrum_approximations.compute import distances, spectra_table
from experiments.spectrum_approximations.plot import plot_spectra

STUDY = "spectrum_approximations"


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its tables and figures."""
    parser = cli.base_parser(STUDY, __doc__, problem="digits_2c2d")
    cli.add_training_args(parser, optimizers="sgd")
    parser.add_argument(
        "--fraction", type=int, default=8, help="sub-sampling 1/fraction"
    )
    args = parser.parse_args(argv)
    if args.quick and args.epochs is None:
        args.epochs = 5
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    inputs, labels = cli.held_out_batch(args, data)
    evaluate = partial(_evaluate, inputs=inputs, labels=labels, fraction=args.fraction)
    table = cli.train_and_tabulate(args, problem, data, STUDY, lambda run: evaluate)
    summary = combine(
        [distances(table, ["problem", "optimizer", "step"])],
        args.out / f"{STUDY}_distances.csv",
    )
    figures = plot_spectra(table, summary, args.out)
    cli.report(STUDY, args.out / f"{STUDY}_distances.csv", figures)
    return {
        "table": args.out / f"{STUDY}.csv",
        "distances": args.out / f"{STUDY}_distances.csv",
        "figures": figures,
    }


def _evaluate(model, loss_fn, step, *, inputs, labels, fraction):
    return spectra_table(model, loss_fn, inputs, labels, fraction)


if __name__ == "__main__":
    main()
