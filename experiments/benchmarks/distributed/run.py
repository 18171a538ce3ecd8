"""Data-parallel curvature: time, per-rank peak memory and bytes sent for 1/2/4 ranks.

    python -m experiments.benchmarks.distributed.run --ranks 1 2 4 --batch-size 32

Each configuration starts ``R`` gloo processes on this machine (loopback), splits
one global batch of 3C3D inputs (random CIFAR-shaped data: the numbers of interest
do not depend on the pixels) over them and runs ``LowRankGGN(process_group=True)``
once for warm-up and ``--repeats`` times measured. Reported per configuration:
median time of the pass incl. eigenvalues (on a 2-core machine the time with more
ranks than cores is indicative only), the largest per-rank peak RSS above the
rank's baseline, the bytes each rank sent (``ggn.communication``) and the bytes
its dense ``V`` would have needed. Results: ``results.csv`` and ``results.md`` in
``--out``; every configuration's measurement is stored in ``raw/`` with the options
that produced it (``--batch-size``, ``--compute``, ``--repeats``, the number of ranks)
and is reused when re-run if it is complete and was made with these options;
a damaged or foreign file is measured again (with a warning). Delete a file in
``raw/`` to redo its configuration. A second run on the same ``--out`` is refused
while the first one writes.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import socket
import statistics
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backpack import backpack, extend
from torch import nn

import vivitlib
from experiments.common.files import (
    CorruptFileError,
    atomic_write_bytes,
    read_bytes_or_none,
)
from experiments.common.locking import claim_folder
from experiments.common.tables import write_table
from experiments.problems import cnn_3c3d


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compute", choices=["eigenvalues", "all"], default="eigenvalues"
    )
    parser.add_argument("--out", default="results/benchmarks/distributed")
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = extend(cnn_3c3d((3, 32, 32), 10).eval())
        loss_fn = extend(nn.CrossEntropyLoss())
        X = torch.randn(args.batch_size, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch_size,))
        start = rank * args.batch_size // world
        stop = (rank + 1) * args.batch_size // world
        compute = (
            ("eigenvalues",) if args.compute == "eigenvalues" else vivitlib.QUANTITIES
        )
        baseline = _peak_rss_mib()
        times = []
        for repeat in range(args.repeats + 1):
            ggn = vivitlib.LowRankGGN(
                model.parameters(), compute=compute, process_group=True
            )
            dist.barrier()
            tic = time.perf_counter()
            with backpack(*ggn.extensions, extension_hook=ggn.hook):
                loss_fn(model(X[start:stop]), y[start:stop]).backward()
            block = ggn.blocks[0]
            elapsed = time.perf_counter() - tic
            model.zero_grad(set_to_none=True)
            if repeat:
                times.append(elapsed)
        traffic = ggn.communication
        queue.put(
            {
                "rank": rank,
                "time_s": statistics.median(times),
                "peak_mib": _peak_rss_mib() - baseline,
                "bytes_sent": sum(t.bytes_sent for t in traffic),
                "dense_bytes": sum(t.dense_bytes for t in traffic),
                "K": block.num_directions,
                "per_layer": [
                    [list(t.shape), t.representation, t.bytes_sent, t.dense_bytes]
                    for t in traffic
                ],
            }
        )
    finally:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    """Run one configuration in ``world`` fresh processes; summarise the ranks."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, args, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    ranks = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return {
        "ranks": world,
        "batch_size": args.batch_size,
        "compute": args.compute,
        "time_s": max(r["time_s"] for r in ranks),
        "peak_mib_per_rank": max(r["peak_mib"] for r in ranks),
        "bytes_sent_per_rank": max(r["bytes_sent"] for r in ranks),
        "dense_v_bytes_per_rank": max(r["dense_bytes"] for r in ranks),
        "K": ranks[0]["K"],
        "per_layer_rank0": json.dumps(
            next(r for r in ranks if r["rank"] == 0)["per_layer"]
        ),
    }


#: Columns of a measurement and the types their values must have.
COLUMNS = {
    "ranks": int,
    "batch_size": int,
    "compute": str,
    "time_s": float,
    "peak_mib_per_rank": float,
    "bytes_sent_per_rank": int,
    "dense_v_bytes_per_rank": int,
    "K": int,
    "per_layer_rank0": str,
}
FORMAT = 1


def measurement_key(world: int, args: argparse.Namespace) -> dict:
    """Every option that changes the measurement of ``world`` ranks."""
    return {
        "ranks": world,
        "batch_size": args.batch_size,
        "compute": args.compute,
        "repeats": args.repeats,
    }


def raw_path(out: Path, key: dict) -> Path:
    """Where the measurement of ``key`` is stored."""
    name = f"3c3d_N{key['batch_size']}_{key['compute']}_R{key['ranks']}"
    return out / "raw" / f"{name}_repeats{key['repeats']}.json"


def write_measurement(path: Path, key: dict, row: dict) -> None:
    """Store ``row`` with the options it was measured for, atomically."""
    record = {"format": FORMAT, "key": key, "row": row}
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())


def read_measurement(path: Path, key: dict) -> dict | None:
    """The stored measurement of ``key``, or ``None`` if there is none.

    Raises:
        CorruptFileError: If the file is damaged, incomplete, holds a value of the
            wrong type or was measured with other options.

    """
    data = read_bytes_or_none(path)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError as err:
        raise CorruptFileError(f"Measurement {path} is damaged ({err}).") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptFileError(f"Measurement {path} is not a measurement record.")
    if record.get("key") != key:
        raise CorruptFileError(
            f"Measurement {path} was made for {record.get('key')}, not for {key}."
        )
    row = record.get("row")
    if not isinstance(row, dict) or set(row) != set(COLUMNS):
        raise CorruptFileError(f"Measurement {path} lacks columns of {list(COLUMNS)}.")
    for name, kind in COLUMNS.items():
        value = row[name]
        valid = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            valid = isinstance(value, int | float) and math.isfinite(value)
        if not valid:
            kind_name = f"finite {kind.__name__}" if kind is float else kind.__name__
            raise CorruptFileError(
                f"Measurement {path} has {name}={value!r}, not a {kind_name}."
            )
    if any(row[name] != key[name] for name in ("ranks", "batch_size", "compute")):
        raise CorruptFileError(f"Measurement {path} disagrees with its own key.")
    return row


def measured(out: Path, world: int, args: argparse.Namespace) -> dict:
    """The measurement of ``world`` ranks: the stored one if valid, else a new one."""
    key = measurement_key(world, args)
    path = raw_path(out, key)
    try:
        row = read_measurement(path, key)
    except CorruptFileError as err:
        warnings.warn(f"{err} Measuring it again.", UserWarning, stacklevel=2)
        row = None
    if row is None:
        print(f"measuring {world} rank(s) ...", flush=True)
        row = measure(world, args)
        write_measurement(path, key, row)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure (or reuse) every configuration; write ``results.csv`` and ``.md``."""
    args = parse_args(argv)
    out = Path(args.out)
    claim_folder(out)  # a second run on this folder is refused
    rows = [measured(out, world, args) for world in args.ranks]
    _write_tables(rows, out)
    return rows


def _write_tables(rows: list[dict], out: Path) -> None:
    write_table(pd.DataFrame(rows), out / "results.csv")
    lines = [
        "| ranks | N | compute | time s | peak MiB/rank | sent MiB/rank "
        "| dense V MiB/rank | ratio | K |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sent, dense = (
            r["bytes_sent_per_rank"] / 2**20,
            r["dense_v_bytes_per_rank"] / 2**20,
        )
        ratio = f"{sent / dense:.3f}" if dense else "–"
        lines.append(
            f"| {r['ranks']} | {r['batch_size']} | {r['compute']} | {r['time_s']:.2f} "
            f"| {r['peak_mib_per_rank']:.0f} | {sent:.1f} | {dense:.1f} | {ratio} "
            f"| {r['K']} |"
        )
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    print(f"tables: {out / 'results.csv'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
