"""Time the fast backpropagation rules against stock BackPACK's (issue 13, item 2).

``python -m experiments.benchmarks.ggn.backprop_rules [--problem 3c3d]
[--batch-size 64] [--repeats 5] [--whole-pass]``

After one BackPACK-extended forward pass, backpropagates a random factor with
``C = 10`` columns through every layer that has a fast rule
(:mod:`vivitlib.extensions.fast_backprop`): with BackPACK's derivatives, with
the fast ones out of place and (activations) in place, interleaved; prints the
median seconds per layer and their sum, single-threaded by default. With
``--whole-pass`` it also times complete eigenvalue passes of
:class:`vivitlib.LowRankGGN` with BackPACK's rules and with the fast ones.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from backpack import backpack

import vivitlib
from experiments.benchmarks.ggn.problems import make_problem
from vivitlib.extensions import backpack_ext
from vivitlib.extensions.fast_backprop import FAST_DERIVATIVES, FAST_SQRT


def _stock(fast: type) -> type:
    return next(c for c in fast.__mro__ if c.__module__.startswith("backpack."))


def _median_time(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[tuple[str, float, float, float]]:
    """Print and return ``(layer, stock s, fast s, in-place or fast s)`` per layer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="3c3d")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--whole-pass", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = make_problem(args.problem, args.batch_size)
    with backpack():
        problem.model(problem.X)
    rows = []
    for name, module in problem.model.named_modules():
        fast = FAST_DERIVATIVES.get(type(module))
        if fast is None:
            continue
        mat = torch.randn(args.columns, *module.output.shape)
        rules = {"stock": _stock(fast)(), "fast": fast()}
        calls = {
            key: functools.partial(rule.jac_t_mat_prod, module, None, None, mat)
            for key, rule in rules.items()
        }
        if hasattr(fast, "jac_t_mat_prod_"):
            calls["in_place"] = functools.partial(
                rules["fast"].jac_t_mat_prod_, module, mat.clone()
            )
        times: dict[str, list[float]] = {k: [] for k in calls}
        with torch.no_grad():
            for _ in range(args.repeats):
                for key, call in calls.items():
                    times[key].append(_median_time(call, 1))
        medians = {k: statistics.median(t) for k, t in times.items()}
        label = f"{name} {type(module).__name__}"
        rows.append((label, medians["stock"], medians["fast"],
                     medians.get("in_place", medians["fast"])))  # fmt: skip
        print(f"{label:24s} " + "  ".join(f"{k} {v:.4f} s" for k, v in medians.items()),
              flush=True)  # fmt: skip
    total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"{'total':24s} stock {total[0]:.4f} s  fast {total[1]:.4f} s  "
          f"in_place (where possible) {total[2]:.4f} s")  # fmt: skip
    if args.whole_pass:
        whole_pass(problem, args.repeats)
    return rows


def whole_pass(problem, repeats: int) -> dict[str, float]:
    """Median seconds of an eigenvalue pass with BackPACK's and with the fast rules."""

    def run() -> None:
        ggn = vivitlib.LowRankGGN(problem.params, compute=("eigenvalues",))
        problem.zero_grad()
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            problem.loss_fn(problem.model(problem.X), problem.y).backward()
        ggn.blocks[0].evals  # noqa: B018

    times: dict[str, list[float]] = {"stock": [], "fast": []}
    try:
        for _ in range(repeats + 1):
            for key in times:
                backpack_ext.FAST_SQRT = FAST_SQRT if key == "fast" else {}
                times[key].append(_median_time(run, 1))
    finally:
        backpack_ext.FAST_SQRT = FAST_SQRT
    medians = {k: statistics.median(t[1:]) for k, t in times.items()}
    print("eigenvalue pass: " + "  ".join(f"{k} {v:.3f} s" for k, v in medians.items()))
    return medians


if __name__ == "__main__":
    main()
