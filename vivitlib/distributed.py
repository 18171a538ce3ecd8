"""Global-batch curvature across ``torch.distributed`` ranks: exchange factors, not V.

With the batch split over ``R`` ranks, the GGN factor of the concatenated batch
is ``V = [V_1 … V_R]``. Each layer's share of ``V_r`` is held in factored form
(for a linear or convolution weight the backpropagated ``s`` and the layer input
``a``; otherwise the dense ``[C, n_r, D_p]`` block), so each rank all-gathers
whichever form of its share is smaller, in rank order. Every rank then holds the
layer's factor of the global batch and contracts it exactly as a single process
would: the global Gram matrix, eigenvalues and lifted eigenvectors are identical
on every rank, and per-sample quantities cover every global sample.

Failure behaviour: the exchanges are collectives. If one rank raises before or
during a pass while the others wait in an exchange, the waiting ranks raise when
the process group's timeout expires (``torch.distributed.init_process_group(...,
timeout=...)``; 30 minutes by default for gloo). Set a short timeout when
debugging; :func:`new_group_with_timeout` makes a sub-group with its own.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vivitlib.extensions.losses import LossWeighting
from vivitlib.factors import Factor, Grads, OuterFactor
from vivitlib.factors.costs import CostModel


def resolve_group(process_group: Any) -> Any:
    """``None`` (single process), or the process group to exchange factors in.

    Args:
        process_group: ``None``/``False`` for a single process, ``True`` for the
            default group (``torch.distributed`` must be initialised), or a
            process group.

    Raises:
        RuntimeError: If a group is asked for but ``torch.distributed`` is not
            initialised.
    """
    if process_group is None or process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group was given, but torch.distributed is not initialised: "
            "call torch.distributed.init_process_group(...) first (e.g. under "
            "torchrun), or pass process_group=None for a single process."
        )
    return dist.group.WORLD if process_group is True else process_group


def new_group_with_timeout(seconds: float, backend: str | None = None) -> Any:
    """A process group over all ranks whose collectives time out after ``seconds``.

    Pass it as ``process_group=`` so that a rank failing mid-pass makes the
    others raise after ``seconds`` instead of the default 30 minutes. Every rank
    must call it (it is itself a collective).
    """
    return dist.new_group(
        backend=backend, timeout=datetime.timedelta(seconds=float(seconds))
    )


@dataclass
class LayerTraffic:
    """Bytes one rank contributed to the exchange of one parameter's pieces.

    Attributes:
        shape: The parameter's shape.
        representation: ``'outer'`` (``s`` and ``a``) or ``'dense'``.
        bytes_sent: Bytes of this rank's pieces (padding included).
        dense_bytes: Bytes of this rank's dense ``V_p`` plus dense per-sample
            gradients, for comparison.
    """

    shape: tuple[int, ...]
    representation: str
    bytes_sent: int
    dense_bytes: int


@dataclass
class FactorExchange:
    """One pass's exchange: batch layout of every rank and the traffic log.

    Build with :meth:`start` at the loss module (a collective).
    """

    group: Any
    sizes: list[int]
    factor_scale: float
    grads_scale: float
    weighting: LossWeighting
    traffic: list[LayerTraffic] = field(default_factory=list)

    @classmethod
    def start(cls, group: Any, local: LossWeighting, reduction: str) -> FactorExchange:
        """Gather batch sizes, counted samples and normalisers of every rank.

        The local factor is rescaled by ``sqrt(Z_r / Z)`` and local per-sample
        gradients by ``Z_r / Z`` (``Z_r``: this rank's normaliser, ``Z`` the
        global one), so the gathered pieces are those of the loss on the
        concatenated batch with the same reduction.
        """
        device = local.counted.device
        head = torch.tensor(
            [float(local.counted.numel()), local.normaliser], dtype=torch.float64
        ).to(device)
        heads = _all_gather_equal(head, group)
        sizes = [int(h[0]) for h in heads]
        counted = all_gather_cat(local.counted.to(torch.uint8), 0, sizes, group)
        total = sum(float(h[1]) for h in heads) if reduction == "mean" else 1.0
        weighting = LossWeighting(None, total, counted.bool())
        ratio = local.normaliser / total
        return cls(group, sizes, ratio**0.5, ratio, weighting)

    @property
    def batch_size(self) -> int:
        """Samples in the global batch."""
        return sum(self.sizes)

    def exchange(
        self, param: Tensor, factor: Factor, grads: Grads | None
    ) -> tuple[Factor, Grads | None]:
        """Rescale this rank's pieces and all-gather them in rank order."""
        factor = factor.scaled(self.factor_scale)
        grads = None if grads is None else grads.scaled(self.grads_scale)
        shared = factor.shares_input(grads)
        dense_numel = factor.dense_numel() + _numel(grads, dense=True)
        stored_numel = factor.stored_numel() + _numel(grads, input_shared=shared)
        factored = isinstance(factor, OuterFactor) and CostModel.send_factored(
            stored_numel, dense_numel
        )
        if not factored:
            factor = factor.dense()
            grads = None if grads is None else grads.dense()
            shared = False
        gather = self._gather
        source = ("gathered", factor.source) if factored else None
        new_factor = factor.map_samples(gather, source)
        new_grads = None
        if grads is not None:
            new_grads = grads.map_samples(
                gather, source if shared else None, new_factor if shared else None
            )
        itemsize = factor.s.element_size() if factored else factor.v.element_size()
        self.traffic.append(
            LayerTraffic(
                tuple(param.shape),
                "outer" if factored else "dense",
                (stored_numel if factored else dense_numel) * itemsize,
                dense_numel * itemsize,
            )
        )
        return new_factor, new_grads

    def _gather(self, tensor: Tensor, dim: int) -> Tensor:
        return all_gather_cat(tensor, dim, self.sizes, self.group)


def _numel(grads: Grads | None, dense: bool = False, input_shared: bool = False) -> int:
    if grads is None:
        return 0
    return grads.dense_numel() if dense else grads.stored_numel(input_shared)


def broadcast_from_first(tensor: Tensor, group: Any) -> Tensor:
    """``tensor`` as held by the group's first rank, on every rank (a collective)."""
    if group is None:
        return tensor
    out = tensor.detach().clone().contiguous()
    dist.broadcast(out, src=dist.get_global_rank(group, 0), group=group)
    return out


def mean_over_ranks(value: float, group: Any) -> float:
    """The mean of a Python number over the group's ranks (identical on each)."""
    if group is None:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return float(total) / dist.get_world_size(group)


def select_samples(
    factor: Factor,
    grads: Grads | None,
    curv: list[int] | None,
    grad: list[int] | None,
) -> tuple[Factor, Grads | None]:
    """Keep the factor's columns of samples ``curv`` and gradient rows ``grad``."""
    shared = curv == grad and factor.shares_input(grads)
    if curv is not None:
        factor = factor.map_samples(_take(curv, factor.device), ("curv", factor.source))
    if grads is not None and grad is not None:
        grads = grads.map_samples(
            _take(grad, factor.device),
            factor.source if shared else ("grad", grads.source),
            factor if shared else None,  # the selected factor: same input rows
        )
    return factor, grads


def _take(samples: list[int], device: torch.device):
    """A :data:`~vivitlib.factors.SampleMap` keeping ``samples``."""
    index = torch.tensor(samples, device=device)
    return lambda tensor, dim: tensor.index_select(dim, index)


def all_gather_cat(tensor: Tensor, dim: int, sizes: list[int], group: Any) -> Tensor:
    """All-gather ``tensor`` from every rank and concatenate along ``dim``.

    ``sizes[r]`` is rank ``r``'s extent along ``dim``; shorter pieces are padded
    for the collective and trimmed afterwards.
    """
    longest = max(sizes)
    tensor = tensor.contiguous()
    missing = longest - tensor.shape[dim]
    if missing:
        shape = list(tensor.shape)
        shape[dim] = missing
        tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim)
    pieces = _all_gather_equal(tensor, group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes)], dim)


def _all_gather_equal(tensor: Tensor, group: Any) -> list[Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor, group=group)
    return pieces
