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
``--out``; a finished configuration is skipped when re-run (delete the CSV row's
file in ``raw/`` to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backpack import backpack, extend
from torch import nn

import vivitlib
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


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    for world in args.ranks:
        path = raw / f"3c3d_N{args.batch_size}_{args.compute}_R{world}.json"
        if path.exists():
            row = json.loads(path.read_text())
        else:
            print(f"measuring {world} rank(s) ...", flush=True)
            row = measure(world, args)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(path)
        rows.append(row)
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
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"tables: {out / 'results.csv'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
