"""Where the factor's backpropagation may stop: below the last grouped parameter.

BackPACK backpropagates the GGN factor to the network's first layer even when
only some parameters need curvature (``LowRankGGN(model.fc.parameters())``).
:class:`RemainingParams` tracks, within one pass, which of the wanted
parameters BackPACK has not reached yet; once none is left the factor
extension stops (no more backpropagation, its stored factors freed).

It stops only where that is safe: each wanted parameter must enter the
autograd graph exactly once (one incoming edge to its gradient accumulator).
A parameter used by two modules (tied weights) or not used at all keeps the
whole backpropagation, so the collector's own checks still see it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.nn import Module


def parameter_uses(root: Tensor, wanted: set[int]) -> dict[int, int]:
    """How many autograd edges enter each wanted parameter's accumulator.

    Args:
        root: A tensor whose graph to walk (the model output).
        wanted: ``id`` of the parameters to count.

    Returns:
        ``id`` -> number of edges, for the wanted parameters found.
    """
    counts: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in wanted:
                counts[id(variable)] = counts.get(id(variable), 0) + 1
            stack.append(child)
    return counts


class RemainingParams:
    """The wanted parameters a pass has not reached yet.

    Args:
        wanted: ``id`` of the parameters whose factors are needed.
    """

    def __init__(self, wanted: Iterable[int]):
        self._left = set(wanted)

    @classmethod
    def start(cls, wanted: set[int], model_output: Tensor) -> RemainingParams | None:
        """Tracking for a pass from ``model_output``, or ``None`` where unsafe."""
        uses = parameter_uses(model_output, wanted)
        if any(uses.get(key, 0) != 1 for key in wanted):
            return None
        return cls(wanted)

    @property
    def done(self) -> bool:
        """Whether every wanted parameter has been reached."""
        return not self._left

    def visit(self, module: Module) -> bool:
        """Record ``module``'s parameters as reached; return :attr:`done`."""
        for param in module.parameters(recurse=False):
            self._left.discard(id(param))
        return self.done
