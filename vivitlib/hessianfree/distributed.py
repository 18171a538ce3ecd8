"""Summing operator products over ``torch.distributed`` workers.

Each worker holds a shard of the data (e.g. through a
``torch.utils.data.DistributedSampler`` with ``shuffle=False``); an operator
built on every rank sums its local products, then all-reduces them in float64,
so every rank sees the same full-data product and runs identical Lanczos
iterations (random probes come from a ``torch.Generator`` seeded alike on
every rank).

Example (run on every rank after ``dist.init_process_group("gloo", ...)``)::

    sampler = DistributedSampler(dataset, shuffle=False)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler)
    H = hf.HessianOperator(model, loss_fn, loader)   # distributed=None: auto
    evals, evecs = hf.topk_eigh(H, k=5)              # same on every rank

Note that ``DistributedSampler`` pads shards to equal length by repeating
samples unless the dataset size is divisible by the world size; pass
``drop_last=True`` to the sampler or pick a divisible size for exact results.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Return whether a ``torch.distributed`` group with several ranks is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_distributed(distributed: bool | None) -> bool:
    """Resolve the ``distributed`` switch of an operator.

    Args:
        distributed: ``None`` to all-reduce whenever a process group with
            several ranks is initialised, ``True`` to require one, ``False`` to
            never communicate.

    Returns:
        Whether products are all-reduced.

    Raises:
        RuntimeError: If ``distributed=True`` but no process group is active.

    """
    if distributed is None:
        return is_distributed()
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first."
        )
    return bool(distributed)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks in place and return it.

    Args:
        tensor: Any tensor; summed as is (the operators pass float64).

    Returns:
        ``tensor``, now holding the sum over ranks.

    """
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_count(count: int, device: torch.device) -> int:
    """Return the sum of an integer ``count`` over all ranks."""
    buf = torch.tensor([count], dtype=torch.int64, device=device)
    return int(all_reduce_sum(buf).item())
