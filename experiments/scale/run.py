"""Study 3: critical batch sizes. Run ``python -m experiments.scale.run``.

For each problem and method (plain gradient; GGN eigenvalues exact, sub-sampled,
MC; layer-wise Newton steps; ``vivit-for-pytorch`` where installed), the largest
batch size whose peak memory stays within ``--memory-budget-gb``, measured in a
fresh subprocess per point (CUDA allocator peak on GPU, peak RSS on CPU). The
search doubles the batch up to ``--max-batch``; a method that still fits there is
marked ``capped`` (``N_crit ≥ max-batch``, "≥" on the bar), not given a limit.

Columns of ``scale.csv``: ``problem``, ``method``, ``device``, ``budget_gb``,
``n_crit`` (largest batch size that fits; empty if the computation failed for
another reason), ``capped`` (true: ``n_crit`` is a lower bound), ``max_batch``.
``scale_measurements.csv``: one row per measured batch size with ``peak_bytes``,
``seconds`` and ``error`` (empty, ``out of memory: ...``, ``failed: ...``).
"""

from __future__ import annotations

import pandas as pd

from experiments.common import cli
from experiments.common.results import combine, write_environment
from experiments.problems import get_problem
from experiments.scale.measure import METHODS, vivit_available
from experiments.scale.plot import plot_critical
from experiments.scale.search import critical_batch_size, subprocess_measure

STUDY = "scale"
MEASURE = subprocess_measure


def parse_args(argv: list[str] | None = None):
    """Parse the command line (see ``--help``)."""
    parser = cli.base_parser(STUDY, __doc__, problem="digits_mlp,digits_2c2d")
    add = parser.add_argument
    add("--methods", default=",".join(METHODS), help="comma-separated methods")
    add("--memory-budget-gb", type=float, default=2.0, help="memory budget")
    add("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    add("--start", type=int, default=8, help="first batch size")
    add(
        "--max-batch",
        type=int,
        default=2**17,
        help="largest batch size tried; a method that fits it is reported as ≥",
    )
    add("--timeout", type=float, default=600, help="seconds per measurement")
    args = parser.parse_args(argv)
    if args.quick:
        args.problem, args.memory_budget_gb = "digits_2c2d", 0.25
        args.max_batch = min(args.max_batch, 2**16)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the study; return the paths of its tables and figure."""
    args = parse_args(argv)
    cli.setup(args)
    write_environment(args.out, vars(args))
    methods = args.methods.split(",")
    if vivit_available() and "vivit_eigvalsh" not in methods:
        methods.append("vivit_eigvalsh")
    rows, measurements = [], []
    for name in args.problem.split(","):
        get_problem(name)
        for method in methods:
            config = {"problem": name, "method": method, "device": args.device}
            threads = args.threads or 1
            measure = MEASURE(name, method, args.device, threads, args.timeout)
            n_crit, points, capped = critical_batch_size(
                measure,
                args.out,
                config,
                args.memory_budget_gb * 2**30,
                args.start,
                args.max_batch,
                # change a measurement's time or whether it times out:
                options={"threads": threads, "timeout": args.timeout},
            )
            rows.append(
                {
                    **config,
                    "budget_gb": args.memory_budget_gb,
                    "n_crit": n_crit,
                    "capped": capped,
                    "max_batch": args.max_batch,
                }
            )
            measurements.append(points)
            bound = "≥ " if capped else ""
            print(f"[{STUDY}] {name:>20} {method:>18}: N_crit {bound}= {n_crit}")
    table = combine([pd.DataFrame(rows)], args.out / f"{STUDY}.csv")
    combine(measurements, args.out / f"{STUDY}_measurements.csv")
    figure = plot_critical(table, args.out)
    cli.report(STUDY, args.out / f"{STUDY}.csv", [figure])
    return {"table": args.out / f"{STUDY}.csv", "figures": [figure]}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
