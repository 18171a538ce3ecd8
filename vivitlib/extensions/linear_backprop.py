"""A linear layer's transposed Jacobian as a pending map on a lazy factor.

In a CNN the first linear layer after ``Flatten`` is usually much wider at its
input than at its output (DeepOBS 2C2D: 3136 -> 1024), and BackPACK's
``Jᵀ`` forms the factor at its input ``[C, N, in]``. Under a ``max_memory``
budget that factor, when it exceeds the budget's
:attr:`~vivitlib.memory.MemoryBudget.lazy_bytes`, becomes the lazy source of
every factor further down (:mod:`.lazy`) and stays alive until the first
layer. Kept lazy here (``x -> x @ W`` per column), the source is the smaller
factor at the layer's output ``[C, N, out]`` instead, which the layer's weight
factor holds anyway.

The layer itself never takes a lazy factor (``takes_lazy``): one reaching it
(an MLP's next linear layer keeping its ``Jᵀ`` lazy) is formed first. Without
a budget nothing changes (``grows`` is false).
"""

from __future__ import annotations

from backpack.core.derivatives.linear import LinearDerivatives
from torch import Tensor, nn

from vivitlib.extensions.lazy import ColumnOp, PendingOp, input_shape
from vivitlib.memory import current_budget


class LazyLinearDerivatives(LinearDerivatives):
    """BackPACK's linear derivatives with ``Jᵀ`` also as a pending map."""

    #: A lazy factor reaching the layer is formed first (the factored weight
    #: handler needs its output factor whole).
    takes_lazy = False

    def grows(self, module: nn.Linear) -> bool:
        """Whether a factor at the layer's input is worth keeping lazy.

        Only under a budget, and only where the input is wider than the output
        (the lazy source, the output factor, is then the smaller tensor).
        """
        in_features, out_features = module.weight.shape[1], module.weight.shape[0]
        return current_budget().total_bytes is not None and in_features > out_features

    def column_op(self, module: nn.Linear, subsampling=None) -> PendingOp:
        """``Jᵀ`` as a pending map: ``x @ W`` over the last axis of every column.

        Per column ``[N, ..., out] -> [N, ..., in]``, the arithmetic of
        BackPACK's ``_jac_t_mat_prod``. For 2-D inputs (``[N, in]``) the map
        narrows to input features ``o0:o1`` (``x @ W[:, o0:o1]``, needing all
        of ``x``); with extra input dimensions axis 2 is not the feature axis
        and it does not narrow. Any block of samples uses the same map.
        """
        shape = tuple(input_shape(module, subsampling))
        weight = module.weight.detach()

        def narrow(o0: int, o1: int) -> tuple[ColumnOp, None]:
            return _times(weight[:, o0:o1]), None

        def samples(n0: int, n1: int) -> ColumnOp:
            return _times(weight)

        return PendingOp(
            _times(weight),
            shape,
            fresh=True,
            narrow=narrow if len(shape) == 2 else None,
            samples=samples,
        )


def _times(weight: Tensor) -> ColumnOp:
    """``x -> x @ weight`` (``x`` ``[k, N, ..., out]``), a new tensor."""

    def transposed_linear(x: Tensor, fresh: bool) -> Tensor:
        return x @ weight

    return transposed_linear
