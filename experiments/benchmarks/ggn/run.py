"""Side-by-side benchmark of vivitlib and vivit-for-pytorch (issue 7).

``python -m experiments.benchmarks.ggn.run [--quick] [--out results/benchmarks/ggn]
[--device cuda] [--sizes 3c3d=64,256 resnet18=8,32] [--problems ...] [--configs ...]``

For each problem, batch size and configuration (:data:`runners.CONFIGS`) it
measures, each in a fresh subprocess: wall time (median of ``--repeats`` runs
after one warm-up, both libraries interleaved in the same process) and peak
resident memory above the post-set-up mark (one process per library; of the
first pass, or with ``--steady-memory`` of a pass after a warm-up pass, which
leaves out the first pass's one-time costs; glibc's mmap threshold is then
fixed at 128 KiB, so that the warm-up's freed heap leaves the resident set). Then the
largest 3C3D batch whose exact spectrum fits ``--limit-mib`` of address space.
Raw results are cached per measurement under ``OUT/raw`` (``--force`` redoes
them); ``OUT/results.csv`` and ``OUT/results.md`` hold the table.

Every row with both libraries also cross-checks their outputs from the same
process (:mod:`.crosscheck`): ``vivit_rel_diff`` is their relative difference.

The ``eigvals`` rows also time the **floor** (:mod:`.floor`: plain gradient +
C autograd VJPs + the Gram's minimum multiply-adds at big-GEMM speed +
eigvalsh) interleaved with the libraries; every row of the same problem and
``N`` reports ``x_floor`` = time / floor. The ``newton`` rows also time the
**full floor** (``eigh`` instead of ``eigvalsh``, plus one application of ``V``
and of ``Vᵀ`` at big-GEMM speed) and report ``x_floor_full``. With
``--device cuda`` runs are
synchronised and memory is the peak allocated device memory of a pass
(``torch.cuda.max_memory_allocated``) in the timing process.
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

#: glibc's ``MALLOC_MMAP_THRESHOLD_`` for ``--steady-memory`` measurements.
STEADY_MMAP_THRESHOLD = 131072

FULL_SIZES = {
    "digits_mlp": (64,),
    "wide_mlp": (64, 128, 256),
    "2c2d": (64,),
    "3c3d": (32, 64, 128, 256),
    "allcnn": (64,),
    "vgg_bn": (64,),
    "resnet": (64,),
    "resnet18": (8, 16, 32, 64),
}
QUICK_SIZES = {"digits_mlp": (64,), "wide_mlp": (64,), "2c2d": (16,), "3c3d": (64,),
               "allcnn": (32,), "vgg_bn": (16,), "resnet": (32,),
               "resnet18": (8,)}  # fmt: skip
#: Largest N at which vivit (dense V: C·N·D floats) is run, per problem and device.
#: (vivit's V is 9 GB for 3C3D at N = 256 and for the wide MLP at N = 128.)
VIVIT_MAX_N = {
    "cpu": {"resnet18": 8, "3c3d": 128, "wide_mlp": 64, "2c2d": 16},
    "cuda": {"resnet18": 32},
}


#: The floor timed in a configuration's row (:mod:`.floor`).
FLOOR_OF = {"eigvals": "floor", "newton": "floor_full"}
#: Each floor's components, in order.
FLOOR_PARTS = {
    "floor": ("grad", "vjp", "gram", "eigvalsh"),
    "floor_full": ("grad", "vjp", "gram", "newton", "eigh"),
}


def _cached(path: Path, job: dict[str, Any], force: bool) -> dict[str, Any]:
    if path.exists() and not force:
        return json.loads(path.read_text())
    result = in_subprocess(job)
    path.write_text(json.dumps(result))
    return result


def _row_libraries(args, problem: str, n: int, config: str) -> list[str]:
    """Libraries timed in one row; a floor joins the rows of :data:`FLOOR_OF`."""
    if config == "gradient":
        return ["torch"]
    limit = VIVIT_MAX_N.get(args.device, {}).get(problem)
    libs = [lib for lib in args.libraries if lib != "vivit" or limit is None
            or n <= limit]  # fmt: skip
    if args.no_floor or config not in FLOOR_OF:
        return libs
    return libs + [FLOOR_OF[config]]


def measure_row(args, raw: Path, problem: str, n: int, config: str) -> dict[str, Any]:
    """Time and memory of one configuration for every library."""
    libs = _row_libraries(args, problem, n, config)
    base = dict(problem=problem, batch_size=n, config=config, threads=args.threads,
                device=args.device)  # fmt: skip
    tag = f"{args.device}_{problem}_N{n}_{config}"
    timing = _cached(raw / f"{tag}_time.json",
                     dict(base, kind="time", libraries=libs, repeats=args.repeats),
                     args.force)  # fmt: skip
    row: dict[str, Any] = dict(problem=problem, N=n, config=config)
    agreement = timing.get("agreement", {})
    if "vivit" in libs and config != "gradient":
        row["vivit_rel_diff"] = agreement.get("rel_diff", float("nan"))
        if "error" in agreement:
            row["vivit_rel_diff_error"] = agreement["error"]
    for lib in libs:
        key = "grad" if lib == "torch" else lib
        result = timing.get(lib, {})
        row[f"{key}_s"] = result.get("median_s", float("nan"))
        if "error" in result:
            row[f"{key}_error"] = result["error"]
        if lib in FLOOR_PARTS:
            for part in FLOOR_PARTS[lib]:
                row[f"{lib}_{part}_s"] = result.get(f"{part}_s", float("nan"))
            continue
        if args.device != "cpu":
            row[f"{key}_MiB"] = result.get("peak_mib", float("nan"))
            continue
        job = dict(base, kind="memory", libraries=[lib], warm=args.steady_memory)
        if args.steady_memory:  # the warm-up's freed heap leaves the resident set
            job["mmap_threshold"] = STEADY_MMAP_THRESHOLD
        kind = "steady_mem" if args.steady_memory else "mem"
        mem = _cached(raw / f"{tag}_{lib}_{kind}.json", job, args.force)
        row[f"{key}_MiB"] = mem.get("peak_mib", float("nan"))
    return row


def summarise(rows: list[dict[str, Any]], libraries: list[str]) -> pd.DataFrame:
    """Add ratios to vivit, multiples of the plain gradient and of the floor."""
    df = pd.DataFrame(rows)
    for lib in libraries:
        for unit in ("s", "MiB"):
            if f"{lib}_{unit}" not in df:
                df[f"{lib}_{unit}"] = float("nan")
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
    if "floor_s" in df:
        floors = df[df.floor_s.notna()].set_index(["problem", "N"]).floor_s
        df["floor_s"] = floors.reindex(idx).to_numpy()
        for lib in libraries:
            df[f"{lib}_x_floor"] = df[f"{lib}_s"] / df["floor_s"]
    if "floor_full_s" in df:  # only the rows that timed it (full compute)
        for lib in libraries:
            df[f"{lib}_x_floor_full"] = df[f"{lib}_s"] / df["floor_full_s"]
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
    cols += [c for c in ("floor_s", "floor_full_s") if c in df]
    for lib in args.libraries:
        cols += [f"{lib}_s", f"{lib}_MiB"]
    cols += [c for c in ("ratio_s", "ratio_MiB", "vivit_rel_diff") if c in df]
    cols += [f"{lib}_x_{floor}" for floor in FLOOR_PARTS for lib in args.libraries
             if f"{lib}_x_{floor}" in df]  # fmt: skip
    cols += [f"{lib}_x_grad_{u}" for lib in args.libraries for u in ("s", "MiB")]
    which = (
        f"a pass after a warm-up pass (MALLOC_MMAP_THRESHOLD_={STEADY_MMAP_THRESHOLD})"
        if args.steady_memory
        else "the first pass"
    )
    memory = (
        f"MiB = peak RSS of {which} above the post-set-up mark, one fresh process "
        "per measurement"
        if args.device == "cpu"
        else "MiB = peak allocated device memory of one pass above the allocation "
        "before it (torch.cuda.max_memory_allocated), after the timed runs"
    )
    lines = [
        "# vivitlib vs vivit-for-pytorch",
        "",
        f"Command: `python -m experiments.benchmarks.ggn.run {' '.join(args.argv)}`",
        f"Device: {args.device}; threads: {args.threads}; time = median of "
        f"{args.repeats} runs after one warm-up (libraries interleaved in one "
        f"process); {memory}. ratio = vivitlib/vivit; x_grad = multiple of the plain "
        "gradient backward; vivit_rel_diff = relative difference between "
        "vivitlib's and vivit's outputs in the same process (crosscheck.py); "
        "floor = plain gradient + C autograd VJPs + the Gram's "
        "minimum multiply-adds at big-GEMM speed + eigvalsh (timed in the eigvals "
        "rows); x_floor = time / floor; floor_full = the same with eigh instead of "
        "eigvalsh plus one application of V and of Vᵀ at big-GEMM speed (timed in "
        "the newton rows); x_floor_full = time / floor_full.",
        "",
        to_markdown(df[cols]),
    ]
    for config, floor in FLOOR_OF.items():
        parts = [f"{floor}_{p}_s" for p in FLOOR_PARTS[floor] if f"{floor}_{p}_s" in df]
        if parts:
            floor_rows = df[df.config == config]
            lines += ["", f"{floor} components (s):", "",
                      to_markdown(floor_rows[["problem", "N", *parts]])]  # fmt: skip
    errors = [c for c in df if c.endswith("_error")]
    for col in errors:
        for _, row in df[df[col].notna()].iterrows():
            lines.append(f"- {row.problem} N={row.N} {row.config}: "
                         f"{col[:-6]} failed: {row[col]}")  # fmt: skip
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor")
    parser.add_argument(
        "--steady-memory", action="store_true",
        help="memory of a pass after a warm-up pass (a training loop's every "
        "step) instead of the first pass in a fresh process",
    )  # fmt: skip
    parser.add_argument(
        "--sizes", nargs="+", default=[], metavar="PROBLEM=N,N",
        help="batch sizes per problem, overriding the (quick) defaults",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.sizes = _parse_sizes(args.sizes)
    args.argv = [] if argv is None else list(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    args.libraries = ["vivitlib"]
    if not args.no_vivit and vivit_available():
        args.libraries.append("vivit")
    return args


def _parse_sizes(items: list[str]) -> dict[str, tuple[int, ...]]:
    sizes = {}
    for item in items:
        name, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--sizes expects PROBLEM=N,N,..., got {item!r}.")
        sizes[name] = tuple(int(v) for v in values.split(","))
    return sizes


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the benchmark, write ``results.csv`` and ``results.md``; return the table."""
    import sys

    args = parse_args(argv)
    if argv is None:
        args.argv = sys.argv[1:]
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    sizes = {**(QUICK_SIZES if args.quick else FULL_SIZES), **args.sizes}
    configs = ["gradient"] + [c for c in args.configs if c != "gradient"]
    rows = []
    missing = [p for p in args.problems if p not in sizes]
    if missing:
        raise SystemExit(f"No batch sizes for {missing}: pass --sizes NAME=N,N,...")
    for problem in args.problems:
        for n in sizes[problem]:
            for config in configs:
                rows.append(measure_row(args, raw, problem, n, config))
                _write_tables(out, rows, {}, args)  # partial results survive a kill
    critical: dict[str, int] = {}
    if not args.no_critical and "3c3d" in args.problems and args.device == "cpu":
        base = dict(problem="3c3d", config="eigvals", threads=args.threads)
        for lib in args.libraries:
            path = raw / f"critical_{lib}_{args.limit_mib:g}.json"
            if path.exists() and not args.force:
                critical[lib] = json.loads(path.read_text())["N"]
                continue
            critical[lib] = largest_batch(lib, base, args.limit_mib, 8, 2048)
            path.write_text(json.dumps({"N": critical[lib]}))
    df = _write_tables(out, rows, critical, args)
    env = dict(python=platform.python_version(), machine=platform.machine(),
               threads=args.threads, libraries=args.libraries, critical=critical,
               limit_mib=args.limit_mib, device=_device_name(args.device))  # fmt: skip
    (out / "environment.json").write_text(json.dumps(_versions(env), indent=1))
    print((out / "results.md").read_text())
    return df


def _write_tables(out: Path, rows: list, critical: dict, args) -> pd.DataFrame:
    df = summarise(rows, args.libraries)
    df.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(_markdown(df, critical, args))
    return df


def _device_name(device: str) -> str:
    if device == "cpu":
        return platform.processor() or platform.machine()
    import torch

    return torch.cuda.get_device_name(torch.device(device))


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
