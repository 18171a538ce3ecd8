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
from vivitlib.factors.representations import (
    DenseFactor,
    DenseGrads,
    OuterFactor,
    OuterGrads,
)


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
        self, param: Tensor, factor: DenseFactor | OuterFactor, grads: Any
    ) -> tuple[DenseFactor | OuterFactor, Any]:
        """Rescale this rank's pieces and all-gather them in rank order."""
        factor = _scaled(factor, self.factor_scale)
        grads = _scaled(grads, self.grads_scale)
        itemsize = _itemsize(factor)
        dense_numel = _dense_factor_numel(factor) + _dense_grads_numel(grads)
        outer_numel = _pieces_numel(factor, grads)
        if isinstance(factor, OuterFactor) and outer_numel <= dense_numel:
            gathered = self._gather_outer(factor, grads)
            representation, numel = "outer", outer_numel
        else:
            factor = factor.dense()
            grads = None if grads is None else grads.dense()
            gathered = self._gather_dense(factor, grads)
            representation, numel = "dense", dense_numel
        self.traffic.append(
            LayerTraffic(
                tuple(param.shape),
                representation,
                numel * itemsize,
                dense_numel * itemsize,
            )
        )
        return gathered

    def _gather_outer(self, factor: OuterFactor, grads: Any):
        sizes, group = self.sizes, self.group
        a = all_gather_cat(factor.a, 0, sizes, group)
        s = all_gather_cat(factor.s, 1, sizes, group)
        source = ("gathered", factor.source)
        new_factor = OuterFactor(s, a, source)
        if grads is None:
            return new_factor, None
        if isinstance(grads, OuterGrads) and _same_input(factor, grads):
            delta = all_gather_cat(grads.delta, 0, sizes, group)
            return new_factor, OuterGrads(delta, a, source)
        return new_factor, self._gather_grads(grads)

    def _gather_dense(self, factor: DenseFactor, grads: Any):
        v = all_gather_cat(factor.v, 1, self.sizes, self.group)
        return DenseFactor(v), None if grads is None else self._gather_grads(grads)

    def _gather_grads(self, grads: Any):
        if isinstance(grads, OuterGrads):
            delta = all_gather_cat(grads.delta, 0, self.sizes, self.group)
            a = all_gather_cat(grads.a, 0, self.sizes, self.group)
            return OuterGrads(delta, a, None)
        return DenseGrads(all_gather_cat(grads.g, 0, self.sizes, self.group))


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


def as_pieces(factor: Any, grads: Any) -> tuple[Any, Any]:
    """BackPACK's dense tensors as :class:`DenseFactor` / :class:`DenseGrads`."""
    if isinstance(factor, Tensor):
        factor = DenseFactor(factor.flatten(2))
    if isinstance(grads, Tensor):
        grads = DenseGrads(grads.flatten(1))
    return factor, grads


def select_samples(
    factor: DenseFactor | OuterFactor, grads: Any, curv: list[int] | None, grad: Any
):
    """Keep the factor's columns of samples ``curv`` and gradient rows ``grad``."""
    factor = _take(factor, curv, "curv")
    grads = _take(grads, grad, "grad")
    if curv is not None and curv == grad and isinstance(grads, OuterGrads):
        grads = OuterGrads(grads.delta, grads.a, factor.source)  # same input rows
    return factor, grads


def _take(piece: Any, samples: list[int] | None, tag: str) -> Any:
    """A piece restricted to ``samples`` (its sample axis: 1 for factors, else 0)."""
    if piece is None or samples is None:
        return piece
    index = torch.tensor(samples, device=_device(piece))
    if isinstance(piece, OuterFactor):
        s, a = piece.s.index_select(1, index), piece.a.index_select(0, index)
        return OuterFactor(s, a, (tag, piece.source))
    if isinstance(piece, OuterGrads):
        delta, a = piece.delta.index_select(0, index), piece.a.index_select(0, index)
        return OuterGrads(delta, a, (tag, piece.source))
    if isinstance(piece, DenseFactor):
        return DenseFactor(piece.v.index_select(1, index))
    return DenseGrads(piece.g.index_select(0, index))


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


def _scaled(piece: Any, scale: float) -> Any:
    """A factor or per-sample-gradient piece times ``scale`` (inputs ``a`` shared)."""
    if piece is None or scale == 1:
        return piece
    if isinstance(piece, OuterFactor):
        return OuterFactor(piece.s * scale, piece.a, piece.source)
    if isinstance(piece, OuterGrads):
        return OuterGrads(piece.delta * scale, piece.a, piece.source)
    if isinstance(piece, DenseFactor):
        return DenseFactor(piece.v * scale)
    return DenseGrads(piece.g * scale)


def _same_input(factor: OuterFactor, grads: OuterGrads) -> bool:
    return factor.source is not None and factor.source == grads.source


def _pieces_numel(factor, grads) -> int:
    if not isinstance(factor, OuterFactor):
        return _dense_factor_numel(factor) + _dense_grads_numel(grads)
    numel = factor.s.numel() + factor.a.numel()
    if isinstance(grads, OuterGrads):
        numel += grads.delta.numel() + (
            0 if _same_input(factor, grads) else grads.a.numel()
        )
    elif grads is not None:
        numel += grads.g.numel()
    return numel


def _dense_factor_numel(factor) -> int:
    if isinstance(factor, OuterFactor):
        C, N, _, O = factor.s.shape  # noqa: E741
        return C * N * O * factor.a.shape[-1]
    return factor.v.numel()


def _dense_grads_numel(grads) -> int:
    if grads is None:
        return 0
    if isinstance(grads, OuterGrads):
        return grads.delta.shape[0] * grads.delta.shape[-1] * grads.a.shape[-1]
    return grads.g.numel()


def _itemsize(factor) -> int:
    tensor = factor.s if isinstance(factor, OuterFactor) else factor.v
    return tensor.element_size()


def _device(piece: Any) -> torch.device:
    """Device of a factor or per-sample-gradient piece."""
    for name in ("s", "delta", "v", "g"):
        if hasattr(piece, name):
            return getattr(piece, name).device
    raise TypeError(f"Not a factor or gradient piece: {type(piece).__name__}.")
