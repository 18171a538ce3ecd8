"""A backpropagated factor kept as its source plus pending per-column operations.

Backpropagating the GGN factor ``[C, N, *features]`` through a network applies
the same linear map to every column ``c``. Where a layer's output factor would
be large (max pooling's is several times its input; a convolution's transposed
Jacobian grows the features), it need not be formed at all:
:class:`LazyColumns` holds the last formed tensor (the *source*) and the maps
still to apply, and its consumers form a few columns at a time
(:meth:`LazyColumns.columns`). Each column is still computed once per
consumer, so a chain with one consumer (the usual case: the next layer with
parameters) costs no extra time, and memory holds the small source, one chunk
and the consumer's result instead of the large factor.

The maps capture what they need when they are appended (a mask, pooling
indices, a weight), because BackPACK frees a module's stored input after its
step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor

#: ``op(x, fresh) -> y`` for ``x`` ``[k, N, *in]``: the layer's transposed
#: Jacobian on ``k`` columns; it may overwrite ``x`` only when ``fresh`` (``x``
#: is a buffer no one else holds).
ColumnOp = Callable[[Tensor, bool], Tensor]

#: ``narrow(o0, o1) -> (op, needed)``: the map restricted to output channels
#: (axis 2 of ``[k, N, channels, ...]``) ``o0:o1``, and the input channels it
#: needs (``None``: all of them).
Narrowing = Callable[[int, int], tuple[ColumnOp, "tuple[int, int] | None"]]


@dataclass(frozen=True)
class PendingOp:
    """One pending map: the function and the per-column shape it produces.

    Attributes:
        fn: The map (see :data:`ColumnOp`).
        shape: Per-column output shape ``[N, *features]``.
        fresh: Whether ``fn`` returns a new buffer (not a view of its input).
        narrow: The map restricted to some output channels (``None``: the
            layer cannot compute a subset of its output channels alone).
        scatter: For a map that adds every input entry to one output entry of
            its channel (max pooling's ``Jᵀ``): ``index`` ``[N, channels,
            inputs]``, each input's flat position in its channel's output.
            Such a map keeps per-channel sums, and an element-wise map after it
            may run before it at the gathered positions (``at``).
        at: For an element-wise map: ``at(index, shape)`` is the same map for
            inputs taken at flat per-channel positions ``index`` ``[N,
            channels, k]`` of its input (per column ``shape``).
        samples: ``samples(n0, n1)`` is the map restricted to samples
            ``n0:n1`` (axis 1 of ``[k, N, ...]``): it takes ``[k, n1 - n0,
            *in]`` and gives ``[k, n1 - n0, *features]`` (``None``: the map
            cannot act on a block of samples alone).
    """

    fn: ColumnOp
    shape: tuple[int, ...]
    fresh: bool
    narrow: Narrowing | None = None
    scatter: Tensor | None = None
    at: Callable[[Tensor, tuple[int, ...]], PendingOp] | None = None
    samples: Callable[[int, int], ColumnOp] | None = None


class LazyColumns:
    """``[C, N, *features]`` as ``source`` followed by pending per-column maps.

    Immutable: :meth:`then` returns a new object, so one lazy quantity handed to
    several module inputs (a residual branch) is never changed under another.

    Args:
        source: The last formed factor, ``[C, N, *in]``.
        ops: Maps to apply in order.
    """

    def __init__(self, source: Tensor, ops: tuple[PendingOp, ...] = ()):
        self.source = source
        self.ops = ops

    @property
    def shape(self) -> torch.Size:
        """Shape of the factor this stands for."""
        per_column = self.ops[-1].shape if self.ops else self.source.shape[1:]
        return torch.Size((self.source.shape[0], *per_column))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the factor."""
        return self.source.dtype

    @property
    def device(self) -> torch.device:
        """Device of the factor."""
        return self.source.device

    def element_size(self) -> int:
        """Bytes per entry."""
        return self.source.element_size()

    def numel(self) -> int:
        """Entries of the factor if it were formed."""
        return prod(self.shape)

    def column_bytes(self) -> int:
        """Largest per-column tensor formed while forming one column (bytes)."""
        sizes = [prod(self.source.shape[1:])] + [prod(op.shape) for op in self.ops]
        return max(sizes) * self.element_size()

    def sample_column_bytes(self) -> int:
        """Largest per-column tensor formed per sample (bytes).

        :meth:`column_bytes` divided by the number of samples ``N``: forming
        columns for a block of ``n`` samples (:meth:`columns` with
        ``samples``) forms tensors of at most ``n`` times this per column.
        Like :meth:`column_bytes`, the maps' own scratch is not counted.
        """
        sizes = [prod(self.source.shape[2:])] + [prod(op.shape[1:]) for op in self.ops]
        return max(sizes) * self.element_size()

    @property
    def sample_narrowable(self) -> bool:
        """Whether columns can be formed a block of samples at a time.

        True when every map can be restricted to samples (``PendingOp.samples``);
        a source without maps always can.
        """
        return all(op.samples is not None for op in self.ops)

    def then(self, op: PendingOp) -> LazyColumns:
        """This factor followed by one more map.

        An element-wise map after a scatter (ReLU after max pooling's ``Jᵀ``)
        runs before it instead, on the scattered values at their target
        positions: the same products on a smaller tensor.
        """
        last = self.ops[-1] if self.ops else None
        if last is not None and last.scatter is not None and op.at is not None:
            ahead = self.ops[:-1]
            shape = ahead[-1].shape if ahead else tuple(self.source.shape[1:])
            return LazyColumns(self.source, (*ahead, op.at(last.scatter, shape), last))
        return LazyColumns(self.source, (*self.ops, op))

    def columns(
        self, c0: int, c1: int, samples: tuple[int, int] | None = None
    ) -> Tensor:
        """Columns ``c0:c1`` of the factor, ``[c1 - c0, N, *features]``.

        Args:
            c0: First column.
            c1: One past the last column.
            samples: ``(n0, n1)``: form samples ``n0:n1`` only, ``[c1 - c0, n1 -
                n0, *features]``, each map restricted to them (needs
                :attr:`sample_narrowable`). ``None``: all samples.

        Raises:
            NotImplementedError: If ``samples`` is given and a map cannot be
                restricted to samples.
            ValueError: If ``samples`` is not a non-empty range within ``N``.
        """
        if samples is None:
            x, fresh = self.source[c0:c1], False
            for op in self.ops:
                x = op.fn(x, fresh)
                fresh = fresh or op.fresh
            return x
        n0, n1 = self._sample_range(samples)
        x, fresh = self.source[c0:c1, n0:n1], False
        for op in self.ops:
            x = op.samples(n0, n1)(x, fresh)
            fresh = fresh or op.fresh
        return x

    def _sample_range(self, samples: tuple[int, int]) -> tuple[int, int]:
        """``samples`` checked against ``N`` and :attr:`sample_narrowable`."""
        n0, n1 = samples
        N = self.source.shape[1]
        if not 0 <= n0 < n1 <= N:
            raise ValueError(
                f"samples={samples!r} must be a range (n0, n1) with "
                f"0 <= n0 < n1 <= N = {N}; pass one inside the factor's samples."
            )
        if not self.sample_narrowable:
            raise NotImplementedError(
                "This lazy factor has a pending map that cannot be restricted to "
                "samples (PendingOp.samples is None); check sample_narrowable and "
                "form whole columns (samples=None) instead."
            )
        return n0, n1

    @property
    def narrowable(self) -> bool:
        """Whether output channels can be formed alone (every map allows it)."""
        return bool(self.ops) and all(op.narrow is not None for op in self.ops)

    def _narrowed(self, o0: int, o1: int) -> _ChannelPlan:
        """How output channels ``o0:o1`` are formed (see :class:`_ChannelPlan`)."""
        maps, needed, largest, mixing = [], (o0, o1), 0, 0
        for i in reversed(range(len(self.ops))):
            op = self.ops[i]
            if needed is None:
                maps.append((op.fn, op.fresh))
                largest = max(largest, prod(op.shape))
                continue
            fn, needed_in = op.narrow(*needed)
            maps.append((fn, op.fresh))
            largest = max(largest, _entries(op.shape, needed))
            needed = needed_in
            if needed is None:
                mixing = i + 1
        maps.reverse()
        largest = max(largest, _entries(self.source.shape[1:], needed))
        return _ChannelPlan(maps, needed, largest * self.element_size(), mixing)

    def channels(self, o0: int, o1: int) -> Tensor:
        """Output channels ``o0:o1`` of every column, ``[C, N, o1 - o0, ...]``.

        Each map is restricted to the channels the next one needs; before a map
        that needs all its input channels (a convolution's ``Jᵀ``), the maps
        run whole. Formed a column chunk at a time, the chunk sized by the
        narrowed maps' outputs.
        """
        plan = self._narrowed(o0, o1)
        C, needed = self.shape[0], plan.needed
        out = None
        for c0, c1 in self.chunks(plan.column_bytes):
            x, fresh = self.source[c0:c1], False
            if needed is not None:
                x = x[:, :, needed[0] : needed[1]]
            for fn, makes_fresh in plan.maps:
                x = fn(x, fresh)
                fresh = fresh or makes_fresh
            if c1 - c0 == C:
                return x
            if out is None:
                out = x.new_empty(C, *x.shape[1:])
            out[c0:c1] = x
        return out

    def channel_sums(self) -> Tensor:
        """Sums over each channel's features, ``[C, N, channels]``.

        Trailing scatters, which keep per-channel sums, are left out (the
        sums of max pooling's ``Jᵀ`` are those of its smaller input). Formed a
        slice of channels at a time (needs :attr:`narrowable` maps).
        """
        from vivitlib.memory import current_budget

        lazy = self
        while lazy.ops and lazy.ops[-1].scatter is not None:
            lazy = LazyColumns(lazy.source, lazy.ops[:-1])
        C, N, O = lazy.shape[:3]  # noqa: E741
        channel_bytes = lazy.numel() // O * lazy.element_size()
        step = current_budget().columns_per_chunk(channel_bytes, O)
        sums = lazy.source.new_empty(C, N, O)
        for o0 in range(0, O, step):
            o1 = min(O, o0 + step)
            sums[:, :, o0:o1] = lazy.channels(o0, o1).flatten(3).sum(3)
        return sums

    def mixing_ops(self) -> int:
        """How many leading maps every channel slice would run (whole or mixing).

        The last of them needs all its input channels for any of its output
        channels (a convolution's ``Jᵀ``); 0 if every map narrows to its
        input channels.
        """
        if not self.narrowable:
            return 0
        return self._narrowed(0, 1).mixing

    def rebased(self, ops: int) -> LazyColumns:
        """The same factor with its first ``ops`` maps formed (the new source).

        For a consumer forming output channels slice by slice
        (:meth:`channels`): the maps that each slice would rerun whole
        (:meth:`mixing_ops`) are run once, in column chunks.
        """
        if ops == 0:
            return self
        head = LazyColumns(self.source, self.ops[:ops]).materialise()
        return LazyColumns(head, self.ops[ops:])

    def rebased_bytes(self, ops: int) -> int:
        """Bytes of the source :meth:`rebased` forms for ``ops`` maps."""
        shape = self.ops[ops - 1].shape if ops else self.source.shape[1:]
        return self.shape[0] * prod(shape) * self.element_size()

    def materialise(self) -> Tensor:
        """The whole factor, formed a few columns at a time into one buffer.

        Without pending maps it is the source itself (no copy).
        """
        if not self.ops:
            return self.source
        chunks = self.chunks()
        if len(chunks) == 1:
            return self.columns(*chunks[0])
        out = self.source.new_empty(self.shape)
        for c0, c1 in chunks:
            out[c0:c1] = self.columns(c0, c1)
        return out

    def chunks(self, column_bytes: int | None = None) -> list[tuple[int, int]]:
        """Column ranges of the budget's chunk size, covering all columns.

        Args:
            column_bytes: Largest tensor formed per column (default:
                :meth:`column_bytes`, forming whole columns).
        """
        from vivitlib.memory import current_budget

        C = self.shape[0]
        if column_bytes is None:
            column_bytes = self.column_bytes()
        step = current_budget().columns_per_chunk(column_bytes, C)
        return [(c0, min(C, c0 + step)) for c0 in range(0, C, step)]


@dataclass(frozen=True)
class _ChannelPlan:
    """How a slice of output channels is formed from the source.

    Attributes:
        maps: ``(fn, fresh)`` per map, in order, narrowed where possible.
        needed: Source channels read (``None``: all).
        column_bytes: Largest tensor formed per column (bytes).
        mixing: Leading maps run whole or mixing all channels (see
            :meth:`LazyColumns.mixing_ops`).
    """

    maps: list[tuple[ColumnOp, bool]]
    needed: tuple[int, int] | None
    column_bytes: int
    mixing: int


def _entries(shape, channels: tuple[int, int] | None) -> int:
    """Entries per column ``[N, channels, ...]`` restricted to ``channels``."""
    if channels is None or not shape[1]:
        return prod(shape)
    return prod(shape) // shape[1] * (channels[1] - channels[0])


class StepResults:
    """A layer step's results on one quantity, computed once, handed out once each.

    BackPACK asks a layer's rule for each parameter's result and for the
    backpropagated quantity in turn; a step on a lazy factor computes them
    together (one pass over its columns). The results are kept until each
    has been taken, and dropped then.
    """

    def __init__(self):
        self._quantity: object = None
        self._left: dict[str, object] = {}

    def take(self, quantity: object, name: str, compute) -> object:
        """Result ``name`` for ``quantity`` (``compute()`` gives all, on first ask)."""
        if self._quantity is not quantity:
            self._quantity, self._left = quantity, compute()
        value = self._left.pop(name)
        if not self._left:
            self._quantity, self._left = None, {}
        return value


def materialised(quantity):
    """``quantity`` with a lazy factor formed (anything else is returned as is)."""
    return quantity.materialise() if isinstance(quantity, LazyColumns) else quantity


def input_shape(module, subsampling: list[int] | None) -> list[int]:
    """Shape of ``module``'s input for the kept samples (a column's shape below it)."""
    shape = list(module.input0.shape)
    if subsampling is not None:
        shape[0] = len(subsampling)
    return shape
