"""A convolution reached by a lazy factor: its factors from column chunks.

When the factor backpropagated to a convolution's output is lazy
(:class:`~vivitlib.extensions.lazy.LazyColumns`), the layer's step forms it a
few columns at a time and, from each chunk, the columns of the bias factor
``[C, N, O]``, of the weight's dense factor ``[C, N, *weight.shape]`` and --
where it is small enough to form -- of the factor backpropagated to the
layer's input. A large one stays lazy instead (the convolution's ``Jᵀ``
appended to the chain). Memory then holds the lazy source, one chunk and the
results, never the factor at the layer's output.

This pays where the weight's dense factor is smaller than the factor at the
output (the first convolution of a network after max pooling: 3C3D's first
layer at ``N = 64`` has a 12 MiB ``V`` and a 122 MiB output factor). Where it
is larger, the output factor is formed a slice of channels at a time instead
(:func:`channel_step`, for the ``'dense'`` Gram plan); otherwise
(:func:`lazy_plan` ``None``) it is formed whole and the layer takes its usual
factored path.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from vivitlib.extensions.layers import input_source
from vivitlib.extensions.lazy import LazyColumns
from vivitlib.extensions.lazy_factor import ChannelSlicedFactor
from vivitlib.factors import current_cost_model
from vivitlib.memory import current_budget


def _requires_grad(param: Tensor) -> bool:
    return param.requires_grad


def _wants(module: Module, name: str, wants: Callable[[Tensor], bool]) -> bool:
    param = getattr(module, name, None)
    return param is not None and wants(param)


def lazy_plan(
    module: Module,
    quantity: LazyColumns,
    unfoldable: bool,
    wants: Callable[[Tensor], bool] = _requires_grad,
) -> str | None:
    """How a convolution handles a lazy output factor, or ``None`` to form it.

    * ``'columns'``: the weight's dense factor is smaller than the output
      factor: both factors from column chunks (:func:`conv_step`);
    * ``'channels'``: the ``'dense'`` Gram plan applies and every pending map
      can form output channels alone: the weight's factor stays lazy
      (:class:`~vivitlib.extensions.lazy_factor.ChannelSlicedFactor`), the
      bias factor from channel slices (:func:`channel_step`).
    """
    C, N, O = quantity.shape[:3]  # noqa: E741
    small = C * N * module.weight.numel() < quantity.numel()
    if small or not _wants(module, "weight", wants):
        return "columns"
    if not (unfoldable and quantity.narrowable):
        return None
    T, I = prod(quantity.shape[3:]), module.weight[0].numel()  # noqa: E741
    model = current_cost_model()
    if not model.prefer_factored(C, N, T, O, I):
        return None
    return "channels" if model.gram_plan_for(C, N, T, O, I) == "dense" else None


def sliceable(quantity: LazyColumns) -> LazyColumns:
    """``quantity`` with the maps every channel slice would rerun formed once.

    A channel slice of a factor behind a convolution's ``Jᵀ`` (a map mixing
    all channels) runs that ``Jᵀ`` and the maps before it whole, on small
    column chunks, once per slice (3C3D at ``N = 256``: 440 small
    ``conv_transpose`` calls for the second convolution's slices where one
    pass in column chunks does the same work in a third of the time). So they
    run once (:meth:`~vivitlib.extensions.lazy.LazyColumns.rebased`), and their
    output becomes the new lazy source -- without a budget always (laziness
    must not cost time), under a budget only if it fits the budget's
    :attr:`~vivitlib.memory.MemoryBudget.lazy_bytes` (the share a formed
    factor may take); otherwise the slices rerun them.
    """
    ops = quantity.mixing_ops()
    if not ops:
        return quantity
    budget = current_budget()
    if budget.total_bytes is not None and budget.keeps_lazy(
        quantity.rebased_bytes(ops)
    ):
        return quantity
    return quantity.rebased(ops)


def channel_step(
    derivatives: Any,
    module: Module,
    quantity: LazyColumns,
    subsampling: list[int] | None,
    unfolded: Tensor,
    wants: Callable[[Tensor], bool] = _requires_grad,
) -> dict[str, Any]:
    """Like :func:`conv_step`, the output factor formed a slice of channels at a time.

    The weight's factor is a
    :class:`~vivitlib.extensions.lazy_factor.ChannelSlicedFactor`; the bias
    factor is summed from channel slices; the input's factor stays lazy (the
    convolution's ``Jᵀ`` appended) unless it is small enough to form.
    """
    C, N, O = quantity.shape[:3]  # noqa: E741
    quantity = sliceable(quantity)
    results: dict[str, Any] = {
        "weight": ChannelSlicedFactor(
            quantity, unfolded, input_source(module, subsampling)
        )
    }
    budget = current_budget()
    if _wants(module, "bias", wants):
        results["bias"] = quantity.channel_sums()
    if module.input0.requires_grad:
        op = derivatives.column_op(module, subsampling=subsampling)
        lazy = quantity.then(op)
        in_bytes = C * prod(op.shape) * quantity.element_size()
        results["input"] = lazy if budget.keeps_lazy(in_bytes) else lazy.materialise()
    budget.note_excess(
        f"{type(module).__name__} (its unfolded input and the lazy source)",
        (unfolded.numel() + quantity.source.numel()) * quantity.element_size(),
    )
    return results


def conv_step(
    derivatives: Any,
    module: Module,
    quantity: LazyColumns,
    subsampling: list[int] | None,
    unfolded: Tensor | None,
    wants: Callable[[Tensor], bool] = _requires_grad,
) -> dict[str, Any]:
    """Bias and weight factors and the input's factor, from column chunks.

    Args:
        derivatives: The layer's derivatives (BackPACK's, with ``column_op``).
        module: The convolution, during its BackPACK step.
        quantity: Lazy factor at the output ``[C, N, O, *out]``.
        subsampling: Samples of the factor (``None``: all).
        unfolded: The unfolded input ``[N, T, I]`` (``groups=1`` and zero
            padding), or ``None`` for BackPACK's weight product per chunk.
        wants: ``param -> bool``: whether a parameter needs its factor.

    Returns:
        ``{"bias": [C, N, O], "weight": [C, N, *weight.shape], "input": ...}``
        for the parameters that need a factor and, if the input needs one, its
        factor (formed, or lazy when larger than the budget allows).
    """
    C, N, O = quantity.shape[:3]  # noqa: E741
    results: dict[str, Any] = {}
    if _wants(module, "bias", wants):
        results["bias"] = quantity.source.new_empty(C, N, O)
    if _wants(module, "weight", wants):
        results["weight"] = quantity.source.new_empty(C, N, *module.weight.shape)
    form_input = None
    if module.input0.requires_grad:
        op = derivatives.column_op(module, subsampling=subsampling)
        in_bytes = C * prod(op.shape) * quantity.element_size()
        if current_budget().keeps_lazy(in_bytes):
            results["input"] = quantity.then(op)
        else:
            form_input = op
            results["input"] = quantity.source.new_empty(C, *op.shape)
    held = [t for t in results.values() if isinstance(t, Tensor)]
    current_budget().note_excess(
        f"{type(module).__name__} (one column of its factor and its results)",
        quantity.source.numel() * quantity.element_size()
        + quantity.column_bytes()
        + sum(t.numel() * t.element_size() for t in held),
    )
    for c0, c1 in quantity.chunks():
        s = quantity.columns(c0, c1)  # [k, N, O, *out]
        if "bias" in results:
            results["bias"][c0:c1] = s.flatten(3).sum(3)
        if "weight" in results:
            out = results["weight"][c0:c1]
            _weight_columns(derivatives, module, s, subsampling, unfolded, out)
        if form_input is not None:
            results["input"][c0:c1] = form_input.fn(s, False)
        del s
    return results


def _weight_columns(derivatives, module, s, subsampling, unfolded, out) -> None:
    """Write the weight factor of columns ``s`` ``[k, N, O, *out]`` into ``out``."""
    k, N, O = s.shape[:3]  # noqa: E741
    if unfolded is None:
        out.copy_(
            derivatives.param_mjp(
                "weight", module, None, None, s, sum_batch=False,
                subsampling=subsampling,
            )
        )  # fmt: skip
        return
    for c in range(k):  # Σ_t s[n, o, t] a[n, t, i], one batched product per column
        torch.bmm(s[c].reshape(N, O, -1), unfolded, out=out[c].view(N, O, -1))
