"""Global-batch GGN spectrum under DistributedDataParallel (run with torchrun).

    torchrun --nproc_per_node 2 docs/examples/ddp_curvature.py

Each rank holds a shard of one global batch of 64 digits; the curvature pass
describes the concatenated batch, so every rank prints the same eigenvalues.
DDP averages ``.grad`` as usual; vivitlib exchanges only the layers' factors.
"""

import torch
import torch.distributed as dist
from backpack import backpack, extend
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import vivitlib


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model and global batch on every rank
    model = extend(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    shard = slice(rank * 64 // world, (rank + 1) * 64 // world)

    ddp = DistributedDataParallel(model)
    ggn = vivitlib.LowRankGGN(model.parameters(), process_group=True)
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(ddp(X[shard]), y[shard]).backward()  # DDP all-reduces .grad

    block = ggn.blocks[0]
    sent = sum(t.bytes_sent for t in ggn.communication)
    dense = sum(t.dense_bytes for t in ggn.communication)
    line = (
        f"rank {rank}: K={block.num_directions} top-3 {block.evals[:3].tolist()} "
        f"gammas {tuple(block.gammas.shape)}; sent {sent} B (dense V: {dense} B)"
    )
    for turn in range(world):  # one rank at a time, so lines do not interleave
        if turn == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
