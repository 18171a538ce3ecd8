"""Search for the critical batch size: doubling, then bisection, every point cached."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from experiments.common.results import cached_table

Measure = Callable[[int], pd.DataFrame]


def subprocess_measure(
    problem: str, method: str, device: str, threads: int = 1, timeout: float = 600
) -> Measure:
    """Return ``N -> one-row table`` measuring in a fresh Python process.

    A process that dies (e.g. killed by the kernel's OOM killer) or times out is
    recorded as an error, so it counts as not fitting the budget.
    """

    def measure(batch_size: int) -> pd.DataFrame:
        command = [
            sys.executable,
            "-m",
            "experiments.scale.measure",
            "--problem",
            problem,
            "--method",
            method,
            "--batch-size",
            str(batch_size),
            "--device",
            device,
            "--threads",
            str(threads),
        ]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=Path(__file__).parents[2],
            )
        except subprocess.TimeoutExpired:
            return _row(None, None, "timeout")
        if done.returncode != 0:
            # a process killed by a signal (e.g. the OOM killer) has a negative code
            kind = "out of memory" if done.returncode < 0 else "failed"
            message = f"{kind}: exit {done.returncode} {done.stderr[-200:]}"
            return _row(None, None, message)
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            return _row(result["peak_bytes"], result["seconds"], result["error"])
        except (IndexError, KeyError, TypeError, ValueError):
            return _row(None, None, f"failed: unreadable output {done.stdout[-200:]!r}")

    return measure


def _row(peak, seconds, error) -> pd.DataFrame:
    return pd.DataFrame(
        {"peak_bytes": [peak], "seconds": [seconds], "error": [error or ""]}
    )


def critical_batch_size(
    measure: Measure,
    out_dir: Path,
    config: dict,
    budget_bytes: float,
    start: int = 8,
    max_batch: int = 4096,
    resolution: float = 0.125,
    options: dict | None = None,
) -> tuple[int | None, pd.DataFrame, bool]:
    """Find the largest batch size whose peak memory fits ``budget_bytes``.

    Doubles ``N`` from ``start`` until a pass does not fit (or ``max_batch`` is
    passed), then bisects until the bracket is narrower than ``resolution`` times
    its lower end. Each measurement is one cached table, so a re-run skips them.

    Args:
        measure: ``N -> one-row table`` with ``peak_bytes``, ``seconds``, ``error``.
        out_dir: The study's output folder.
        config: Columns identifying the measurement (problem, method, device).
        budget_bytes: The memory budget.
        start: First batch size. Default: ``8``.
        max_batch: Largest batch size tried. Default: ``4096``.
        resolution: Relative width at which bisection stops. Default: ``0.125``.
        options: Further settings that change a measurement but are not columns
            (e.g. threads and timeout); part of each cached table's key. Default:
            none.

    Returns:
        ``(N_crit, measurements, capped)``; ``N_crit = 0`` if even ``start`` does
        not fit, ``None`` if the computation failed for another reason than memory;
        ``capped`` is true when every size up to ``max_batch`` fitted, so that
        ``N_crit`` is only a lower bound (``N_crit ≥ ...``).

    """
    rows = []

    def fits(batch_size: int) -> bool:
        row = cached_table(
            out_dir,
            {**config, "batch_size": batch_size},
            lambda: measure(batch_size),
            options=options,
        )
        rows.append(row)
        error = row["error"].iloc[0]
        error = "" if pd.isna(error) else str(error)
        if error.startswith("failed"):
            raise _Failed(error)
        return not error and float(row["peak_bytes"].iloc[0]) <= budget_bytes

    try:
        n_crit, capped = _search(fits, start, max_batch, resolution)
    except _Failed:
        n_crit, capped = None, False
    return n_crit, pd.concat(rows, ignore_index=True), capped


class _Failed(Exception):
    """A measurement failed for another reason than memory."""


def _search(fits, start: int, max_batch: int, resolution: float) -> tuple[int, bool]:
    low, high, size = 0, None, start
    while size <= max_batch:
        if not fits(size):
            high = size
            break
        low, size = size, size * 2
    if high is None:
        return low, True
    while high - low > max(1, resolution * low):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, False
