"""Whether ``max_memory=`` is honoured: peak memory and time per budget (issue 13).

``python -m experiments.benchmarks.ggn.budgets [--problems 3c3d 2c2d allcnn]
[--sizes 3c3d=64 ...] [--fractions 0.5 1 2] [--repeats 3] [--memory-repeats 2]
[--out results/benchmarks/ggn_budgets]``

``max_memory`` bounds what a pass holds beyond a plain backward pass
(:mod:`vivitlib.memory`). For every problem and ``N`` this measures, each in
fresh processes: the plain gradient's peak ``P`` (the smallest of
``--memory-repeats``), then vivitlib's eigenvalue pass without a budget, with
the smallest budget (1 byte: the floor a network allows) and with
``max_memory = f · P`` for every fraction ``f``: its peak (the largest of
``--memory-repeats``) and its time (median of ``--repeats`` after a warm-up).
Each peak is measured twice: for the first pass in a fresh process (with the
one-time costs of a first pass, 40-60 MiB, in both ``P`` and the peak) and for
a pass after a warm-up pass (``_steady`` columns: what every step of a training
loop holds). A budget is **honoured** when the peak stays within
``P + max_memory``: a user
whose whole process may use ``B`` (at least the floor) sets
``max_memory = B - P``; ``f = 0.5`` is the issue's "budget of 1.5× a plain
gradient".

Peaks are resident high-water marks above the resident memory after set-up
(:func:`~.measure.memory_job`), with glibc's mmap threshold fixed at 128 KiB
(``--mmap-threshold``), so that freed buffers leave the resident set and the
peak follows live memory. Results: ``OUT/budgets.csv`` and ``OUT/budgets.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.benchmarks.ggn.measure import in_subprocess
from experiments.benchmarks.ggn.run import to_markdown

SIZES = {"3c3d": (64,), "2c2d": (64,), "allcnn": (64,)}
#: Budgets as fractions of the plain gradient's peak.
FRACTIONS = (0.5, 1.0, 2.0)


def _peak(job: dict[str, Any], repeats: int, pick) -> float:
    peaks = []
    for _ in range(repeats):
        result = in_subprocess(dict(job, kind="memory"))
        if not result.get("ok"):
            raise RuntimeError(f"memory job {job} failed: {result.get('error')}")
        peaks.append(result["peak_mib"])
    return pick(peaks)


def _time(job: dict[str, Any]) -> float:
    result = in_subprocess(dict(job, kind="time"))
    if "error" in result.get("vivitlib", {}) or "vivitlib" not in result:
        raise RuntimeError(f"time job {job} failed: {result}")
    return result["vivitlib"]["median_s"]


#: The passes measured: the first in a fresh process, and one after a warm-up.
PASSES = {"first": False, "steady": True}


def _honoured(peak: float, plain: float, max_memory: int | None) -> str:
    if max_memory is None or max_memory == 1:
        return ""
    return "yes" if peak <= plain + max_memory / 2**20 else "no"


def measure(problem: str, N: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows for one problem and batch size: no budget, the floor, each fraction.

    Every peak is measured for a first pass and for a pass after a warm-up
    (:data:`PASSES`); budgets are fractions of the first pass's plain peak.
    """
    base = dict(problem=problem, batch_size=N, threads=args.threads)
    grad_job = dict(base, config="gradient", libraries=["torch"])
    plain = {
        name: _peak(dict(grad_job, warm=warm), args.memory_repeats, min)
        for name, warm in PASSES.items()
    }
    job = dict(base, config="eigvals", libraries=["vivitlib"], repeats=args.repeats)
    budgets: list[tuple[str, int | None]] = [("none", None), ("1 byte", 1)]
    budgets += [(f"{f:g} x P", int(f * plain["first"] * 2**20)) for f in args.fractions]
    rows, unbudgeted = [], None
    for label, max_memory in budgets:
        budgeted = dict(job, max_memory=max_memory)
        row = dict(
            problem=problem, N=N, budget=label,
            max_memory_MiB=float("nan") if max_memory is None else max_memory / 2**20,
        )  # fmt: skip
        for name, warm in PASSES.items():
            peak = _peak(dict(budgeted, warm=warm), args.memory_repeats, max)
            suffix = "" if name == "first" else f"_{name}"
            row[f"plain{suffix}_MiB"] = plain[name]
            row[f"peak{suffix}_MiB"] = peak
            row[f"x_plain{suffix}"] = peak / plain[name]
            row[f"honoured{suffix}"] = _honoured(peak, plain[name], max_memory)
        seconds = _time(budgeted)
        if max_memory is None:
            unbudgeted = seconds
        row.update(time_s=seconds, x_time=seconds / unbudgeted)
        rows.append(row)
        print(f"{problem} N={N} {label}: peak {row['peak_MiB']:.1f} MiB "
              f"({row['x_plain']:.2f}x plain), after a warm-up "
              f"{row['peak_steady_MiB']:.1f} MiB ({row['x_plain_steady']:.2f}x), "
              f"{seconds:.2f} s", flush=True)  # fmt: skip
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks/ggn_budgets")
    parser.add_argument("--problems", nargs="+", default=list(SIZES))
    parser.add_argument("--sizes", nargs="*", default=[], help="e.g. 3c3d=64,128")
    parser.add_argument("--fractions", nargs="+", type=float, default=FRACTIONS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--mmap-threshold",
        default="131072",
        help="glibc's MALLOC_MMAP_THRESHOLD_ for the measuring processes; "
        "'default' keeps glibc's dynamic threshold (freed heap stays resident)",
    )
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else []
    sizes = {p: SIZES.get(p, (64,)) for p in args.problems}
    for item in args.sizes:
        name, values = item.split("=")
        sizes[name] = tuple(int(v) for v in values.split(","))
    args.size_of = sizes
    return args


@contextlib.contextmanager
def _mmap_threshold(value: str) -> Iterator[None]:
    """The measuring processes' ``MALLOC_MMAP_THRESHOLD_`` inside the block."""
    old = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if value != "default":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = value
    try:
        yield
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        if old is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Measure every budget, write the CSV and Markdown tables, return the rows."""
    args = parse_args(argv)
    rows = []
    with _mmap_threshold(args.mmap_threshold):
        for problem in args.problems:
            for N in args.size_of[problem]:
                rows += measure(problem, N, args)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "budgets.csv", index=False)
    text = [
        "# max_memory honoured?", "",
        f"Command: `python -m {__spec__.name} {' '.join(args.argv)}`",
        f"Machine: {platform.processor() or platform.machine()}; threads: "
        f"{args.threads}; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}. "
        "P = plain gradient peak (MiB, "
        "smallest of the repeats); peak = largest of the repeats; honoured = "
        "peak <= P + max_memory; x_time = time / unbudgeted time. Columns "
        "without a suffix: the first pass in a fresh process (one-time costs "
        "included, for both); `_steady`: a pass after a warm-up pass.",
        "", to_markdown(df),
    ]  # fmt: skip
    (out / "budgets.md").write_text("\n".join(text) + "\n")
    print(f"wrote {out / 'budgets.md'}")
    return df


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
