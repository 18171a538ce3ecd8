"""Max pooling's argmax indices from autograd's graph instead of a second pooling.

BackPACK's max-pooling rule recomputes the pooling with ``return_indices=True``
at every backward pass, although autograd saved exactly these indices for the
plain backward (3C3D: as long as the forward's three poolings). They are
collected when the pass starts (:meth:`PoolingIndices.collect`, at the loss,
before autograd has run any node of the model and released its saved tensors)
and handed to the pooling's rule when BackPACK reaches the module
(:func:`saved_indices`). Memory is unchanged: autograd holds them until the
pooling's node runs, which is right before the module's step.

Where a graph does not expose them (1-D pooling runs as a 2-D one, a node
already run, another PyTorch version), the rule recomputes them as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor
from torch.nn import MaxPool2d, MaxPool3d, Module

#: Autograd nodes of max pooling with saved indices (``_saved_result1``).
_NODES = frozenset({"MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0"})


class PoolingIndices:
    """The max-pooling indices autograd saved for one backward pass."""

    def __init__(self):
        self._saved: dict[int, tuple[object, Tensor]] = {}

    def clear(self) -> None:
        """Drop every collected index tensor."""
        self._saved.clear()

    def collect(self, root: Tensor) -> None:
        """Collect the indices of every max pooling ``root`` depends on.

        Args:
            root: The model output (the loss's input), before its backward ran.
        """
        self.clear()
        stack, seen = [getattr(root, "grad_fn", None)], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if type(node).__name__ in _NODES:
                indices = _saved(node)
                if indices is not None:
                    self._saved[id(node)] = (node, indices)
            stack.extend(child for child, _ in node.next_functions)
        if self._saved:
            _clear_after_backward(self)

    def take(self, module: Module) -> Tensor | None:
        """The indices of ``module``'s pooling (removed from here), or ``None``."""
        node = getattr(getattr(module, "output", None), "grad_fn", None)
        entry = self._saved.pop(id(node), None) if node is not None else None
        if entry is None or entry[0] is not node:
            return None
        indices = entry[1]
        if indices.shape != module.output.shape or indices.dtype != torch.int64:
            return None
        return indices

    @contextmanager
    def offered_to(self, module: Module) -> Iterator[None]:
        """Within the block, :func:`saved_indices` of ``module`` gives its indices."""
        if not isinstance(module, (MaxPool2d, MaxPool3d)):
            yield
            return
        token = _OFFER.set((module, self.take(module)))
        try:
            yield
        finally:
            _OFFER.reset(token)


def _clear_after_backward(indices: PoolingIndices) -> None:
    """Drop what no rule took when the running backward finishes.

    E.g. a 1-D pooling (its node sits behind a squeeze) or a module BackPACK
    did not reach: their indices are not kept alive until the next pass.
    """
    try:
        torch.autograd.Variable._execution_engine.queue_callback(indices.clear)
    except RuntimeError:  # not inside a backward pass: nothing to wait for
        pass


def _saved(node) -> Tensor | None:
    try:
        return node._saved_result1
    except (AttributeError, RuntimeError):  # no such field / already released
        return None


_OFFER: ContextVar[tuple[Module, Tensor | None] | None] = ContextVar(
    "vivitlib_pooling_indices", default=None
)


def saved_indices(module: Module, subsampling: list[int] | None) -> Tensor | None:
    """Autograd's indices of ``module``'s pooling for the kept samples, or ``None``."""
    offer = _OFFER.get()
    if offer is None or offer[0] is not module or offer[1] is None:
        return None
    indices = offer[1]
    if subsampling is not None:
        indices = indices[subsampling]
    return indices
