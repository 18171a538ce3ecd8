"""Side-by-side benchmark of vivitlib and vivit-for-pytorch (issue 7).

``python -m experiments.benchmarks.ggn.run [--quick] [--out results/benchmarks/ggn]``

For each problem, batch size and configuration (:data:`runners.CONFIGS`) it
measures, each in a fresh subprocess: wall time (median of ``--repeats`` runs
after one warm-up, both libraries interleaved in the same process) and peak
resident memory above the post-set-up mark (one process per library). Then the
largest 3C3D batch whose exact spectrum fits ``--limit-mib`` of address space.
Raw results are cached per measurement under ``OUT/raw`` (``--force`` redoes
them); ``OUT/results.csv`` and ``OUT/results.md`` hold the table.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.benchmarks.ggn.measure import in_subprocess, largest_batch
from experiments.benchmarks.ggn.runners import CONFIGS, vivit_available

FULL_SIZES = {"digits_mlp": (64,), "3c3d": (32, 64, 128), "resnet": (64,)}
QUICK_SIZES = {"digits_mlp": (64,), "3c3d": (64,), "resnet": (32,)}


def _cached(path: Path, job: dict[str, Any], force: bool) -> dict[str, Any]:
    if path.exists() and not force:
        return json.loads(path.read_text())
    result = in_subprocess(job)
    path.write_text(json.dumps(result))
    return result


def measure_row(args, raw: Path, problem: str, n: int, config: str) -> dict[str, Any]:
    """Time and memory of one configuration for every library."""
    libs = ["torch"] if config == "gradient" else list(args.libraries)
    base = dict(problem=problem, batch_size=n, config=config, threads=args.threads)
    tag = f"{problem}_N{n}_{config}"
    timing = _cached(raw / f"{tag}_time.json",
                     dict(base, kind="time", libraries=libs, repeats=args.repeats),
                     args.force)  # fmt: skip
    row: dict[str, Any] = dict(problem=problem, N=n, config=config)
    for lib in libs:
        job = dict(base, kind="memory", libraries=[lib])
        mem = _cached(raw / f"{tag}_{lib}_mem.json", job, args.force)
        key = "grad" if lib == "torch" else lib
        row[f"{key}_s"] = timing.get(lib, {}).get("median_s", float("nan"))
        row[f"{key}_MiB"] = mem.get("peak_mib", float("nan"))
    return row


def summarise(rows: list[dict[str, Any]], libraries: list[str]) -> pd.DataFrame:
    """Add ratios to vivit and multiples of the plain gradient backward."""
    df = pd.DataFrame(rows)
    grads = df[df.config == "gradient"].set_index(["problem", "N"])
    df = df[df.config != "gradient"].copy()
    idx = list(zip(df.problem, df.N))
    for unit in ("s", "MiB"):
        base = grads[f"grad_{unit}"].reindex(idx).to_numpy()
        df[f"grad_{unit}"] = base
        for lib in libraries:
            df[f"{lib}_x_grad_{unit}"] = df[f"{lib}_{unit}"] / base
        if {"vivitlib", "vivit"} <= set(libraries):
            df[f"ratio_{unit}"] = df[f"vivitlib_{unit}"] / df[f"vivit_{unit}"]
    return df


def to_markdown(df: pd.DataFrame) -> str:
    """Pipe table with three significant digits (no ``tabulate`` needed)."""

    def fmt(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    rows = df.itertuples(index=False)
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(df: pd.DataFrame, critical: dict[str, int], args) -> str:
    cols = ["problem", "N", "config", "grad_s", "grad_MiB"]
    for lib in args.libraries:
        cols += [f"{lib}_s", f"{lib}_MiB"]
    cols += [c for c in ("ratio_s", "ratio_MiB") if c in df]
    cols += [f"{lib}_x_grad_{u}" for lib in args.libraries for u in ("s", "MiB")]
    lines = [
        "# vivitlib vs vivit-for-pytorch",
        "",
        f"Command: `python -m experiments.benchmarks.ggn.run {' '.join(args.argv)}`",
        f"Threads: {args.threads}; time = median of {args.repeats} runs after one "
        "warm-up (libraries interleaved in one process); MiB = peak RSS above the "
        "post-set-up mark, one fresh process per measurement. ratio = vivitlib/vivit; "
        "x_grad = multiple of the plain gradient backward.",
        "",
        to_markdown(df[cols]),
    ]
    if critical:
        lines += ["", f"Largest 3C3D batch for the exact spectrum under "
                  f"{args.limit_mib:g} MiB address space above set-up: "
                  + ", ".join(f"{k} N={v}" for k, v in critical.items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks/ggn")
    parser.add_argument("--quick", action="store_true", help="few sizes and repeats")
    parser.add_argument("--problems", nargs="+", default=list(FULL_SIZES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit-mib", type=float, default=2048.0)
    parser.add_argument("--no-critical", action="store_true")
    parser.add_argument("--no-vivit", action="store_true")
    parser.add_argument("--force", action="store_true", help="ignore cached results")
    args = parser.parse_args(argv)
    args.argv = [] if argv is None else list(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    args.libraries = ["vivitlib"]
    if not args.no_vivit and vivit_available():
        args.libraries.append("vivit")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the benchmark, write ``results.csv`` and ``results.md``; return the table."""
    import sys

    args = parse_args(argv)
    if argv is None:
        args.argv = sys.argv[1:]
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    configs = ["gradient"] + [c for c in args.configs if c != "gradient"]
    rows = [
        measure_row(args, raw, problem, n, config)
        for problem in args.problems
        for n in sizes[problem]
        for config in configs
    ]
    critical: dict[str, int] = {}
    if not args.no_critical and "3c3d" in args.problems:
        base = dict(problem="3c3d", config="eigvals", threads=args.threads)
        for lib in args.libraries:
            path = raw / f"critical_{lib}_{args.limit_mib:g}.json"
            if path.exists() and not args.force:
                critical[lib] = json.loads(path.read_text())["N"]
                continue
            critical[lib] = largest_batch(lib, base, args.limit_mib, 8, 2048)
            path.write_text(json.dumps({"N": critical[lib]}))
    df = summarise(rows, args.libraries)
    df.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(_markdown(df, critical, args))
    env = dict(python=platform.python_version(), machine=platform.machine(),
               threads=args.threads, libraries=args.libraries, critical=critical,
               limit_mib=args.limit_mib)  # fmt: skip
    (out / "environment.json").write_text(json.dumps(_versions(env), indent=1))
    print((out / "results.md").read_text())
    return df


def _versions(env: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("torch", "backpack-for-pytorch", "vivit-for-pytorch"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    return env


if __name__ == "__main__":
    main()
