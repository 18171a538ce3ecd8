"""Ablation of DampedNewton's defaults: which safeguard settings to ship.

Usage::

    python -m experiments.optimizer_benchmark.ablation --quick
    python -m experiments.optimizer_benchmark.ablation --workers 15

Every configuration of :data:`CONFIGS` (untuned, with a closure) trains each
problem for ``--steps`` steps on ``--seeds`` seeds; ``ablation.csv`` holds the
final training losses, ``ablation_summary.csv`` the median per problem and the
geometric mean of the medians normalised by the best configuration per problem.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import torch

from experiments.common.cli import base_parser, setup
from experiments.common.results import write_environment, write_table
from experiments.optimizer_benchmark.optimizers import Spec
from experiments.optimizer_benchmark.training import train
from experiments.problems import get_problem
from vivitlib.optim import BootstrapDamping, DampedNewton


def _config(percentile=None, **options):
    """``percentile=None``: the shipped bootstrap rule; a number: the percentile."""

    def make(params, value, seed):
        rule = {} if percentile is None else {"percentile": percentile}
        damping = BootstrapDamping(generator=seed, **rule)
        return DampedNewton(params, damping, **options)

    return make


#: Candidate defaults: (bootstrap percentile, safeguard options).
CONFIGS = {
    "shipped": _config(),
    "percentile_25": _config(25.0),
    "percentile_50": _config(50.0),
    "percentile_10": _config(10.0),
    "percentile_15": _config(15.0),
    "p25_damping_1e-2": _config(25.0, initial_damping=1e-2, damping_floor=1e-3),
    "p25_radius_100": _config(25.0, trust_radius=100.0),
    "no_trust_region": _config(trust_radius=None),
    "radius_100": _config(trust_radius=100.0),
    "damping_1e-2": _config(initial_damping=1e-2, damping_floor=1e-3),
    "damping_1e-5": _config(initial_damping=1e-4, damping_floor=1e-5),
    "p25_no_trust_region": _config(25.0, trust_radius=None),
    "p50_no_trust_region": _config(50.0, trust_radius=None),
    "no_safeguards": _config(safeguards=False),
    "no_complement": _config(complement_lr=0.0),
    "no_momentum": _config(complement_momentum=0.0),
    "scaled_trust": _config(trust_solve="scale"),
    "session2_defaults": _config(trust_solve="scale", complement_momentum=0.0),
    "p25_no_complement": _config(25.0, complement_lr=0.0),
}


def one(job: tuple[str, str, int, int]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    problem_name, config, seed, steps = job
    problem = get_problem(problem_name)
    spec = Spec(config, "", (0.0,), "newton", True, CONFIGS[config])
    table = train(problem, problem.load_data(), spec, 0.0, seed, steps, steps, 128)
    last = table.iloc[-1]
    return {"problem": problem_name, "config": config, "seed": seed,
            "train_loss": last["train_loss"], "diverged": bool(last["diverged"]),
            "time_s": last["time_s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = base_parser("optimizer_benchmark", "Ablation of DampedNewton defaults.")
    parser.add_argument(
        "--problems", nargs="+", default=["digits_logreg", "digits_mlp", "digits_2c2d"]
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    args: argparse.Namespace = parser.parse_args(argv)
    if args.quick:
        args.problems, args.seeds, args.steps = args.problems[:2], 2, 40
    setup(args)
    write_environment(args.out / "ablation", vars(args))  # takes the folder's lock
    jobs = [(p, c, s, args.steps) for p in args.problems for c in CONFIGS
            for s in range(args.seeds)]  # fmt: skip
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            rows = list(pool.map(one, jobs))
    else:
        rows = [one(job) for job in jobs]
    table = pd.DataFrame(rows)
    write_table(table, args.out / "ablation" / "ablation.csv")
    score = table.assign(
        train_loss=table["train_loss"].where(~table["diverged"], np.inf)
    ).pivot_table(index="config", columns="problem", values="train_loss",
                  aggfunc="median")  # fmt: skip
    relative = score / score.min()
    score["geomean_vs_best"] = np.exp(np.log(relative).mean(axis=1))
    score["divergences"] = table.groupby("config")["diverged"].sum()
    score = score.sort_values("geomean_vs_best")
    write_table(score.reset_index(), args.out / "ablation" / "ablation_summary.csv")
    print(score.to_string(float_format="%.4g"))
    return score


if __name__ == "__main__":
    main()
