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
(:func:`channel_step`, for the ``'dense'`` Gram plan), or -- under a budget,
for the ``'pairwise'`` plan -- a block of samples at a time
(:func:`sample_step`); otherwise (:func:`lazy_plan` ``None``) it is formed
whole and the layer takes its usual factored path.
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
from vivitlib.extensions.lazy_factor import ChannelSlicedFactor, SampleBlockedFactor
from vivitlib.factors import current_cost_model, kernels
from vivitlib.factors.kernels import InputBlocks
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
      bias factor from channel slices (:func:`channel_step`);
    * ``'samples'``: under a budget, the ``'pairwise'`` Gram plan applies and
      every pending map can form a block of samples alone: the weight's factor
      stays lazy (:class:`~vivitlib.extensions.lazy_factor.SampleBlockedFactor`),
      the bias factor from blocks of samples (:func:`sample_step`).
    """
    C, N, O = quantity.shape[:3]  # noqa: E741
    small = C * N * module.weight.numel() < quantity.numel()
    if small or not _wants(module, "weight", wants):
        return "columns"
    if not unfoldable:
        return None
    T, I = prod(quantity.shape[3:]), module.weight[0].numel()  # noqa: E741
    model = current_cost_model()
    if not model.prefer_factored(C, N, T, O, I):
        return None
    plan = model.gram_plan_for(C, N, T, O, I)
    if plan == "dense" and quantity.narrowable:
        return "channels"
    budgeted = current_budget().total_bytes is not None
    if plan == "pairwise" and budgeted and quantity.sample_narrowable:
        return "samples"
    return None


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
    unfolded: Tensor | InputBlocks,
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
    _note_unfolded(module, quantity, unfolded)
    return results


def _note_unfolded(
    module: Module, quantity: LazyColumns, unfolded: Tensor | InputBlocks
) -> None:
    """Warn where the unfolded input (one block) and the lazy source exceed the budget.

    A step keeping the weight's factor lazy cannot split them.
    """
    N = quantity.shape[1]
    unfolded_numel = unfolded.numel()
    if isinstance(unfolded, InputBlocks):
        unfolded_numel = unfolded_numel // N * min(N, unfolded.step)
    current_budget().note_excess(
        f"{type(module).__name__} (its unfolded input and the lazy source)",
        (unfolded_numel + quantity.source.numel()) * quantity.element_size(),
    )


def sample_step(
    derivatives: Any,
    module: Module,
    quantity: LazyColumns,
    subsampling: list[int] | None,
    unfolded: Tensor | InputBlocks,
    wants: Callable[[Tensor], bool] = _requires_grad,
) -> dict[str, Any]:
    """Like :func:`conv_step`, the weight's factor a block of samples at a time.

    The weight's factor is a
    :class:`~vivitlib.extensions.lazy_factor.SampleBlockedFactor` (its
    ``'pairwise'`` Gram plan forms ``s`` a block of samples at a time); the
    bias factor and the input's factor (lazy unless small enough to form)
    come from :func:`conv_step`, which forms the output factor in column
    chunks or blocks of samples. So the small lazy source travels on, never
    the output factor formed whole.
    """
    weight = module.weight

    def others(param: Tensor) -> bool:
        return param is not weight and wants(param)

    results = conv_step(derivatives, module, quantity, subsampling, None, others)
    results["weight"] = SampleBlockedFactor(
        quantity, unfolded, input_source(module, subsampling)
    )
    _note_unfolded(module, quantity, unfolded)
    return results


def conv_step(
    derivatives: Any,
    module: Module,
    quantity: LazyColumns,
    subsampling: list[int] | None,
    unfolded: Tensor | InputBlocks | None,
    wants: Callable[[Tensor], bool] = _requires_grad,
) -> dict[str, Any]:
    """Bias and weight factors and the input's factor, from column chunks.

    Under a budget that one column of ``quantity`` (all ``N`` samples)
    exceeds, and where every pending map acts on a block of samples alone
    (:attr:`~vivitlib.extensions.lazy.LazyColumns.sample_narrowable`), the
    chunks are blocks of samples as well (:func:`_samples_per_block`).

    Args:
        derivatives: The layer's derivatives (BackPACK's, with ``column_op``).
        module: The convolution, during its BackPACK step.
        quantity: Lazy factor at the output ``[C, N, O, *out]``.
        subsampling: Samples of the factor (``None``: all).
        unfolded: The unfolded input ``[N, T, I]`` (``groups=1`` and zero
            padding) or its blocks of samples, or ``None`` for BackPACK's
            weight product per chunk.
        wants: ``param -> bool``: whether a parameter needs its factor.

    Returns:
        ``{"bias": [C, N, O], "weight": [C, N, *weight.shape], "input": ...}``
        for the parameters that need a factor and, if the input needs one, its
        factor (formed, or lazy when larger than the budget allows).
    """
    C, N, O = quantity.shape[:3]  # noqa: E741
    budget = current_budget()
    results: dict[str, Any] = {}
    if _wants(module, "bias", wants):
        results["bias"] = quantity.source.new_empty(C, N, O)
    if _wants(module, "weight", wants):
        results["weight"] = quantity.source.new_empty(C, N, *module.weight.shape)
    form_input = None
    if module.input0.requires_grad:
        op = derivatives.column_op(module, subsampling=subsampling)
        in_bytes = C * prod(op.shape) * quantity.element_size()
        if budget.keeps_lazy(in_bytes):
            results["input"] = quantity.then(op)
        else:
            form_input = op
            results["input"] = quantity.source.new_empty(C, *op.shape)
    step = _samples_per_block(quantity, unfolded, form_input, "weight" in results)
    held = [t for t in results.values() if isinstance(t, Tensor)]
    unfolded_bytes = 0
    if unfolded is not None:
        unfolded_bytes = unfolded.numel() * unfolded.element_size()
        if isinstance(unfolded, InputBlocks):
            unfolded_bytes = unfolded_bytes // N * min(N, step, unfolded.step)
    budget.note_excess(
        f"{type(module).__name__} (one column of its factor and its results)",
        quantity.source.numel() * quantity.element_size()
        + quantity.sample_column_bytes() * step
        + unfolded_bytes
        + sum(t.numel() * t.element_size() for t in held),
    )
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        samples = None if step == N else (n0, n1)
        a = _input_block(unfolded, samples)
        block_op = form_input
        if form_input is not None and samples is not None:
            block_op = form_input.samples(n0, n1)
        for c0, c1 in quantity.chunks(quantity.sample_column_bytes() * (n1 - n0)):
            s = quantity.columns(c0, c1, samples)  # [k, n1 - n0, O, *out]
            if "bias" in results:
                results["bias"][c0:c1, n0:n1] = s.flatten(3).sum(3)
            if "weight" in results:
                out = results["weight"][c0:c1, n0:n1]
                _weight_columns(derivatives, module, s, subsampling, a, out)
            if block_op is not None:
                fn = block_op if samples is not None else block_op.fn
                results["input"][c0:c1, n0:n1] = fn(s, False)
            del s
    return results


def _samples_per_block(
    quantity: LazyColumns,
    unfolded: Tensor | InputBlocks | None,
    form_input: Any,
    weight: bool,
) -> int:
    """Samples per chunk of :func:`conv_step` (``N``: whole columns).

    Blocks of samples are used under a budget that one whole column exceeds,
    or whose unfolded input is given in blocks, where every map (the pending
    ones, the layer's own ``Jᵀ`` if the input's factor is formed) acts on a
    block of samples alone, and the weight's factor comes from the unfolded
    input (BackPACK's weight product reads the whole stored input).
    """
    N = quantity.shape[1]
    budget = current_budget()
    blocked = isinstance(unfolded, InputBlocks)
    if budget.total_bytes is None:
        return N
    if quantity.column_bytes() <= budget.column_bytes and not blocked:
        return N
    if not quantity.sample_narrowable or (weight and unfolded is None):
        return N
    if form_input is not None and form_input.samples is None:
        return N
    step = budget.columns_per_chunk(max(1, quantity.sample_column_bytes()), N)
    return min(step, unfolded.step) if blocked else step


def _input_block(
    unfolded: Tensor | InputBlocks | None, samples: tuple[int, int] | None
) -> Tensor | InputBlocks | None:
    """The unfolded input of ``samples`` (``None``: all, possibly in blocks)."""
    if unfolded is None or samples is None:
        return unfolded
    if isinstance(unfolded, InputBlocks):
        return unfolded.take(*samples)
    return unfolded[samples[0] : samples[1]]


def _weight_columns(derivatives, module, s, subsampling, a, out) -> None:
    """Write the weight factor of columns ``s`` ``[k, N, O, *out]`` into ``out``.

    ``a`` is the unfolded input of the same samples (a tensor or blocks of
    samples), or ``None`` for BackPACK's weight product.
    """
    k, N, O = s.shape[:3]  # noqa: E741
    if a is None:
        out.copy_(
            derivatives.param_mjp(
                "weight", module, None, None, s, sum_batch=False,
                subsampling=subsampling,
            )
        )  # fmt: skip
        return
    # Σ_t s[n, o, t] a[n, t, i]: one batched product per column and block
    for n0, n1, block in kernels.sample_blocks(a):
        for c in range(k):
            rows = s[c, n0:n1].reshape(n1 - n0, O, -1)
            torch.bmm(rows, block, out=out[c, n0:n1].view(n1 - n0, O, -1))
