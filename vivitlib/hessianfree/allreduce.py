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

**When a rank fails.** Every product is a collective: if one rank raises
(bad input, NaN parameters, out of memory) but its process stays alive, the
other ranks wait in the all-reduce until the process group's timeout, which
is 30 minutes by default (``init_process_group(timeout=...)``). Pass
``timeout=`` (seconds or a ``datetime.timedelta``) to an operator to bound
that wait: the operator then runs its collectives in its own process group
created with that timeout (``torch.distributed.new_group(timeout=...)``, on
every rank, when the operator is built), and a rank whose peers do not join
within it raises a ``RuntimeError`` naming the timeout instead of hanging::

    H = hf.HessianOperator(model, loss_fn, loader, timeout=60)

The timeout bounds each collective, so pick it above the slowest rank's
product time (a product over the local shard). gloo honours it directly;
NCCL needs its asynchronous error handling (on by default in recent torch).
After such an error the process group is broken: destroy it
(``torch.distributed.destroy_process_group()``) and restart the job.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from vivitlib._checks import check_positive_float


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


def check_timeout(timeout: object) -> timedelta | None:
    """Return ``timeout`` (seconds or ``timedelta``) as a ``timedelta``, or ``None``.

    Raises:
        TypeError: If ``timeout`` is neither a number nor a ``timedelta``.
        ValueError: If it is not positive and finite.

    """
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    return timedelta(seconds=check_positive_float(timeout, "timeout"))


def make_group(timeout: timedelta | None) -> object | None:
    """Return a process group over all ranks with ``timeout`` (``None``: default group).

    Collective: every rank must call it, in the same order.
    """
    if timeout is None:
        return None
    return dist.new_group(timeout=timeout)


def all_reduce_sum(
    tensor: Tensor, group: object | None = None, timeout: timedelta | None = None
) -> Tensor:
    """Sum ``tensor`` over all ranks in place and return it.

    Args:
        tensor: Any tensor; summed as is (the operators pass float64).
        group: Process group (from :func:`make_group`); default the global one.
        timeout: The group's timeout, only used in the error message.

    Returns:
        ``tensor``, now holding the sum over ranks.

    Raises:
        RuntimeError: If the collective fails or times out, e.g. because
            another rank raised an error and never joined it.

    """
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        limit = (
            f"timeout={timeout.total_seconds():g} s"
            if timeout is not None
            else "the process group's timeout"
        )
        raise RuntimeError(
            "Summing a curvature product over the torch.distributed ranks failed or "
            f"did not complete within {limit}: another rank probably raised an "
            "error (see its output) or is stuck. Fix that rank's error; pass "
            "timeout= to the operator to fail sooner. The process group is now "
            f"unusable: destroy it and restart. ({type(err).__name__}: {err})"
        ) from err
    return tensor


def all_reduce_counts(
    counts: list[float],
    device: torch.device,
    group: object | None = None,
    timeout: timedelta | None = None,
) -> list[float]:
    """Return the sums over all ranks of ``counts`` (exact in float64 up to 2⁵³)."""
    buf = torch.tensor(counts, dtype=torch.float64, device=device)
    return all_reduce_sum(buf, group, timeout).tolist()
