"""Small hyperparameter grid of the Lanczos-Newton comparison, on one seed.

Usage::

    python -m experiments.lanczos_newton.tune            # seed 0, 100 steps
    python -m experiments.lanczos_newton.tune --quick    # 30 steps

Each candidate trains for ``--steps`` steps only (no time budget) on seed 0 with the
defaults of :mod:`experiments.lanczos_newton.run` otherwise. The winner per optimizer
has the lowest final training loss among runs that did not diverge. Writes
``<out>/tune.csv`` (default ``results/lanczos_newton_tune``; one row per candidate,
``chosen`` marks the winners); per-candidate tables under ``<out>/tables`` make the
grid resumable. Every candidate's table is keyed by a digest of its whole
:class:`~experiments.lanczos_newton.training.RunConfig` (every option that changes its
numbers), so a changed option trains new candidates and a damaged table is recomputed.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
from tqdm import tqdm

from experiments.common.cli import setup
from experiments.common.results import cached_table, write_environment, write_table
from experiments.lanczos_newton import run as study
from experiments.lanczos_newton.training import SMALL_CNN, train

#: Candidates per optimizer: the field of :class:`RunConfig` varied and its values.
GRID = {
    "sgd": ("lr", [0.03, 0.1, 0.3]),
    "adam": ("lr", [1e-3, 3e-3, 1e-2]),
    "gram_bootstrap": ("damping", [0.1, 1.0, 3.0, 10.0]),
    "lanczos_constant": ("damping", [0.1, 1.0, 3.0]),
    "lanczos_bootstrap": ("damping", [0.1, 1.0, 3.0]),
}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the grid and write ``tune.csv``."""
    args = study.parse_args(argv)
    if args.out == study.parse_args([]).out:  # keep the study's folder clean
        args.out = args.out.parent / f"{args.out.name}_tune"
    setup(args)
    data = SMALL_CNN.load_data()
    args.seeds, args.time_budget = 1, 0.0
    write_environment(args.out, vars(args))  # takes the folder's lock
    base = {c.optimizer: c for c in study.configs(args)}
    rows = []
    candidates = [
        (name, field, value)
        for name, (field, values) in GRID.items()
        if name in base
        for value in values
    ]
    for name, field, value in tqdm(candidates, disable=args.no_progress):
        config = dataclasses.replace(base[name], **{field: value})
        key = {"optimizer": name, field: value}
        key["config"] = study.config_hash(SMALL_CNN.name, config)
        table = cached_table(args.out, key, lambda c=config: train(SMALL_CNN, data, c))
        last = table.iloc[-1]
        rows.append(
            {"optimizer": name, "field": field, "value": value,
             "step": last["step"], "train_loss": last["train_loss"],
             "test_accuracy": last["test_accuracy"],
             "diverged": bool(table["diverged"].astype(bool).any())}
        )  # fmt: skip
    frame = pd.DataFrame(rows)
    ok = frame[~frame["diverged"]]
    best = ok.loc[ok.groupby("optimizer")["train_loss"].idxmin()]
    frame["chosen"] = frame.index.isin(best.index)
    write_table(frame, args.out / "tune.csv")
    print(frame.to_string(index=False, float_format="%.4g"))
    return frame


if __name__ == "__main__":
    main()
