"""List the host synchronisations of one vivitlib pass on a CUDA device.

``python -m experiments.benchmarks.ggn.sync_audit [--problem 3c3d] [--batch-size 64]
[--out FILE]``

Runs one warm-up pass, then one pass per configuration (eigenvalues; full
compute: eigenpairs, directional derivatives, Newton step) under
``torch.cuda.set_sync_debug_mode("warn")`` and counts every synchronising call
by the innermost vivitlib (or BackPACK) source line that triggered it. Needs
CUDA; on a machine without it, says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
import warnings
from pathlib import Path

import torch
from backpack import backpack

import vivitlib
from experiments.benchmarks.ggn.problems import make_problem

CONFIGS = {
    "eigenvalues": ("eigenvalues",),
    "full": ("eigenvalues", "eigenvectors", "directional_derivatives", "newton_step"),
}


def _caller() -> str:
    """Innermost stack frame inside vivitlib or backpack, as ``path:line``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        for package in ("/vivitlib/", "/backpack/"):
            if package in name:
                return f"{package[1:]}{name.split(package, 1)[1]}:{frame.lineno}"
    return "elsewhere"


def _one_pass(problem, compute) -> None:
    ggn = vivitlib.LowRankGGN(problem.params, compute=compute)
    problem.zero_grad()
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
    block = ggn.blocks[0]
    if "newton_step" in compute:
        block.newton_step(1e-3)
        block.evecs(10)
        block.gammas, block.lambdas  # noqa: B018 - evaluated for their syncs
    torch.cuda.synchronize()


def _count_syncs(call) -> collections.Counter:
    """Run ``call()`` in sync-debug mode; count synchronisations by source line."""
    counts: collections.Counter[str] = collections.Counter()
    original = warnings.showwarning

    def record(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            counts[_caller()] += 1
        else:
            original(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return counts


def audit(problem_name: str, batch_size: int) -> dict[str, dict[str, int]]:
    """``{config: {source line: number of synchronising calls}}``."""
    problem = make_problem(problem_name, batch_size, device="cuda")
    result = {}
    for config, compute in CONFIGS.items():
        _one_pass(problem, compute)  # warm-up (lazy initialisation syncs)
        counts = _count_syncs(lambda compute=compute: _one_pass(problem, compute))
        result[config] = dict(counts.most_common())
    return result


def main(argv: list[str] | None = None) -> None:
    """Print (and optionally write) the synchronisation counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="3c3d")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to audit.")
        return
    result = audit(args.problem, args.batch_size)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
