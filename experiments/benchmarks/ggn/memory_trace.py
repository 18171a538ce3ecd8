"""Where a pass's peak memory arises: resident memory per BackPACK module step.

``python -m experiments.benchmarks.ggn.memory_trace [--problem 3c3d]
[--batch-size 64] [--config eigvals] [--max-memory 64MiB]``

Runs one pass of a benchmark configuration (fresh process, as the benchmark's
memory figures) and prints, for every module BackPACK visits, the resident
memory and its high-water mark above the post-set-up mark before and after the
module's extensions and after the extension hook (the Gram contraction).
The step whose high-water mark jumps holds the peak. On 3C3D at ``N = 64``
(issue 13) it showed the peak in the hook of the second convolution (its dense
factor ``V``), not in the backpropagation into the first one.

Resident memory includes free heap that glibc keeps (blocks below its dynamic
mmap threshold); ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment fixes
the threshold so that the trace follows live memory more closely.
"""

from __future__ import annotations

import argparse
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from backpack.extensions.module_extension import ModuleExtension

from experiments.benchmarks.ggn.measure import maxrss_mib as peak_mib
from experiments.benchmarks.ggn.problems import make_problem
from experiments.benchmarks.ggn.runners import CONFIGS, make_runner
from vivitlib.collector import BackpackCollector

_PAGE = resource.getpagesize()


def resident_mib() -> float:
    """Current resident memory of this process (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * _PAGE / 2**20


class _Tracer:
    """Wraps the module extensions and the collector hook to record memory."""

    def __init__(self, base: float):
        self.base = base
        self.rows: list[dict[str, Any]] = []

    def wrap(self, owner: type, name: str, step: str) -> Callable[[], None]:
        original = getattr(owner, name)
        tracer = self

        def traced(obj, *args, **kwargs):
            before, high = resident_mib(), peak_mib()
            out = original(obj, *args, **kwargs)
            module = args[1] if step == "extension" else args[0]
            tracer.rows.append(dict(
                module=type(module).__name__, step=step,
                before=before - tracer.base, after=resident_mib() - tracer.base,
                peak_before=high - tracer.base, peak_after=peak_mib() - tracer.base,
            ))  # fmt: skip
            return out

        setattr(owner, name, traced)
        return lambda: setattr(owner, name, original)


def trace(
    problem: str, batch_size: int, config: str, max_memory: int | str | None = None
) -> list[dict[str, Any]]:
    """One pass of ``config`` with per-step memory rows (MiB above set-up).

    Args:
        problem: A benchmark problem name.
        batch_size: ``N``.
        config: A configuration of :data:`~.runners.CONFIGS` (not ``gradient``).
        max_memory: ``LowRankGGN``'s budget (``None``: the default).

    Returns:
        One dict per step: ``module``, ``step`` (``extension`` or ``hook``),
        ``before``/``after`` resident and ``peak_before``/``peak_after``; a last
        row ``step='pass'`` holds the whole pass's peak.

    Raises:
        ValueError: For ``config='gradient'`` (no BackPACK steps to trace).
    """
    if config == "gradient":
        raise ValueError(
            "The plain gradient has no BackPACK steps; trace e.g. config='eigvals'."
        )
    instance = make_problem(problem, batch_size)
    run = make_runner("vivitlib", config, instance, max_memory=max_memory)
    tracer = _Tracer(peak_mib())
    undo = [
        tracer.wrap(ModuleExtension, "__call__", "extension"),
        tracer.wrap(BackpackCollector, "hook", "hook"),
    ]
    try:
        run()
    finally:
        for restore in undo:
            restore()
    tracer.rows.append(dict(module="", step="pass", before=0.0,
                            after=resident_mib() - tracer.base, peak_before=0.0,
                            peak_after=peak_mib() - tracer.base))  # fmt: skip
    return tracer.rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Print the trace of one pass as a table; return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="3c3d")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--config", default="eigvals", choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-memory", default=None, help="e.g. 64MiB")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = trace(args.problem, args.batch_size, args.config, args.max_memory)
    print(f"{'module':18s} {'step':9s} {'MiB before':>10s} {'after':>8s} "
          f"{'peak before':>11s} {'peak after':>10s}")  # fmt: skip
    for r in rows:
        values = (r["before"], r["after"], r["peak_before"], r["peak_after"])
        sizes = " ".join(f"{v:{w}.1f}" for v, w in zip(values, (10, 8, 11, 10)))
        print(f"{r['module']:18s} {r['step']:9s} {sizes}")
    return rows


if __name__ == "__main__":
    main()
