"""Linear and convolution weights: BackPACK's results handed to `vivitlib.factors`.

A layer kind's fast path is all in this file: the two functions building its
factor and its per-sample gradients from what BackPACK hands over, and one
line in :data:`FACTORED_LAYERS`. Layers not listed use BackPACK's dense
``[C, N, *param.shape]`` factor for that layer only, and so does a listed layer
whenever its function returns ``None``.

Linear and convolution weights (``groups=1``, zero padding) are kept as outer
products: backpropagated factor ``s`` ``[C, N, T, O]`` and layer input ``a``
``[N, T, I]`` (unfolded for convolutions, ``I = C_in · kernel size``; ``T``
positions, 1 for a plain linear layer), built by
:func:`vivitlib.factors.outer_factor`. Everything computed from them, and the
choice of how, belongs to :mod:`vivitlib.factors` and its cost model
(:class:`vivitlib.factors.CostModel`).

Forming ``V`` from the unfolded input avoids BackPACK's weight Jacobian (a
repeated input and a grouped convolution, whose intermediate is the memory
spike of a convolution net); :meth:`~vivitlib.factors.CostModel.prefer_factored`
keeps BackPACK's path only where the unfolded input would outweigh ``V`` and
``s`` together.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from backpack.extensions.firstorder.batch_grad.conv1d import BatchGradConv1d
from backpack.extensions.firstorder.batch_grad.conv2d import BatchGradConv2d
from backpack.extensions.firstorder.batch_grad.conv3d import BatchGradConv3d
from backpack.extensions.firstorder.batch_grad.linear import BatchGradLinear
from backpack.extensions.secondorder.sqrt_ggn.convnd import (
    SqrtGGNConv1d,
    SqrtGGNConv2d,
    SqrtGGNConv3d,
)
from backpack.extensions.secondorder.sqrt_ggn.linear import SqrtGGNLinear
from backpack.utils.conv import unfold_input
from backpack.utils.subsampling import subsample
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

from vivitlib.extensions.conv_backprop import FAST_CONV_DERIVATIVES
from vivitlib.extensions.linear_backprop import LazyLinearDerivatives
from vivitlib.factors import OuterFactor, OuterGrads, current_cost_model, outer_factor
from vivitlib.factors.kernels import InputBlocks
from vivitlib.memory import current_budget

_ConvNd = Conv1d | Conv2d | Conv3d


def conv_unfoldable(module: _ConvNd) -> bool:
    """Whether the factored path applies (``groups=1``, zero padding, no string)."""
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def linear_inputs(module: Linear, subsampling: list[int] | None) -> Tensor:
    """Layer input as ``[N, T, I]`` (extra input dimensions become positions)."""
    x = subsample(module.input0.detach(), subsampling=subsampling)
    return x.reshape(x.shape[0], -1, x.shape[-1])


#: Module -> (its input, samples, unfolded input), all weakly referenced.
_UNFOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: At most one unfolded input kept for the per-sample gradients of its layer:
#: ``(weak reference to the module, unfolded input)``.
_HANDED_OVER: list[tuple[weakref.ref, Tensor]] = []
_HANDING_OVER: ContextVar[bool] = ContextVar("vivitlib_hand_over", default=False)


@contextmanager
def handing_over_inputs(enabled: bool) -> Iterator[None]:
    """Keep unfolded inputs unfolded in this block for the per-sample gradients.

    The factor extension runs before the gradient extension on every module.
    Its steps often drop the unfolded input (a weight factor formed dense from
    column chunks keeps none), so the gradients would unfold it again (a VGG-
    like first block at ``N = 64``: 40 ms and 75 MiB). With ``enabled`` (the
    gradients are of the same samples), the last input unfolded in the block
    is held until :func:`conv_weight_grads` of the same layer takes it: one
    tensor that was alive during the factor step anyway. The gradient
    extension drops whatever is still held once it is done with the module
    (:func:`drop_handed_over`), whether it succeeded or failed, so nothing is
    held between modules.
    """
    token = _HANDING_OVER.set(enabled)
    try:
        yield
    finally:
        _HANDING_OVER.reset(token)


def drop_handed_over() -> None:
    """Forget a held unfolded input (a module's extensions are done, or failed)."""
    _HANDED_OVER.clear()


def _take_handed_over(module: Module) -> Tensor | None:
    """The unfolded input held for ``module``'s gradients, released (or ``None``)."""
    try:
        ref, unfolded = _HANDED_OVER.pop()
    except IndexError:
        return None
    return unfolded if ref() is module else None


def conv_inputs(module: _ConvNd, subsampling: list[int] | None) -> Tensor:
    """Unfolded convolution input as ``[N, T, C_in·kernel]``, unfolded once per visit.

    The factor and the per-sample-gradient extensions both ask for it when
    BackPACK reaches the module; the second gets the first's tensor while that
    is still alive and was made from the very same input tensor and samples.
    """
    key = input_source(module, subsampling)
    cached = _UNFOLDED.get(module)
    if cached is not None:
        input_ref, cached_key, unfolded_ref = cached
        unfolded = unfolded_ref()
        if unfolded is not None and cached_key == key and input_ref() is module.input0:
            return unfolded
    x = subsample(module.input0.detach(), subsampling=subsampling)
    unfolded = unfold_input(module, x).transpose(1, 2)
    _UNFOLDED[module] = (weakref.ref(module.input0), key, weakref.ref(unfolded))
    if _HANDING_OVER.get() and module.weight.requires_grad:
        _HANDED_OVER[:] = [(weakref.ref(module), unfolded)]
    return unfolded


def conv_input_blocks(
    module: _ConvNd, subsampling: list[int] | None
) -> Tensor | InputBlocks:
    """The unfolded input whole, or in blocks of samples where a budget needs it.

    Under a ``max_memory`` whose :attr:`~vivitlib.memory.MemoryBudget.lazy_bytes`
    share the unfolded input exceeds (it is ``kernel size`` times the layer's
    input: 38 MiB for DeepOBS 2C2D's second convolution at ``N = 64``), it is
    unfolded a block of samples at a time, each block within the budget's
    :attr:`~vivitlib.memory.MemoryBudget.column_bytes`, on every request.
    """
    budget = current_budget()
    if budget.total_bytes is None:
        return conv_inputs(module, subsampling)
    x = subsample(module.input0.detach(), subsampling=subsampling)
    N = x.shape[0]
    _, I, T = unfold_input(module, x[:1]).shape  # noqa: E741
    per_sample = T * I * x.element_size()
    if not budget.keeps_lazy(N * per_sample):
        return conv_inputs(module, subsampling)

    def take(n0: int, n1: int) -> Tensor:
        return unfold_input(module, x[n0:n1]).transpose(1, 2)

    step = budget.columns_per_chunk(per_sample, N)
    return InputBlocks((N, T, I), take, step, like=x)


def input_source(module: Module, subsampling: list[int] | None) -> tuple:
    """Identifies a layer's (sub-sampled) input within one pass (``Factor.source``)."""
    return id(module), None if subsampling is None else tuple(subsampling)


def linear_weight_factor(
    module: Linear, backproped: Tensor, subsampling: list[int] | None
) -> OuterFactor | None:
    """Outer-product factor of a linear weight from ``[C, N, ..., O]`` (or ``None``)."""
    C, N, O = backproped.shape[0], backproped.shape[1], backproped.shape[-1]  # noqa: E741
    if not current_cost_model().factored:
        return None
    s = backproped.reshape(C, N, -1, O)
    a = linear_inputs(module, subsampling)
    return outer_factor(s, a, input_source(module, subsampling))


def conv_weight_factor(
    module: _ConvNd, backproped: Tensor, subsampling: list[int] | None
) -> OuterFactor | None:
    """Outer-product factor of a convolution weight, or ``None`` for BackPACK's."""
    if not conv_unfoldable(module):
        return None
    C, N, O = backproped.shape[:3]  # noqa: E741
    T = backproped[0, 0, 0].numel()
    I = module.weight[0].numel()  # noqa: E741
    if not current_cost_model().prefer_factored(C, N, T, O, I):
        return None
    source = input_source(module, subsampling)
    a = conv_input_blocks(module, subsampling)
    if isinstance(a, InputBlocks):
        return _blocked_input_factor(backproped, a, source)
    s = backproped.reshape(C, N, O, T).transpose(2, 3)
    current_budget().note_excess(
        f"{type(module).__name__} (its output factor and unfolded input)",
        (s.numel() + a.numel()) * s.element_size(),
    )
    return outer_factor(s, a, source)


def _blocked_input_factor(backproped: Tensor, a: InputBlocks, source: tuple):
    """The weight's factor for an unfolded input given in blocks of samples.

    The lazy factors' Gram plans (:mod:`.lazy_factor`) read ``a`` block by
    block; here their ``s`` is the formed factor itself (a lazy factor
    without pending maps). Lifting and projections form ``a`` whole.
    """
    from vivitlib.extensions.lazy import LazyColumns
    from vivitlib.extensions.lazy_factor import (
        ChannelSlicedFactor,
        SampleBlockedFactor,
    )

    C, N, O = backproped.shape[:3]  # noqa: E741
    T, I = backproped[0, 0, 0].numel(), a.shape[-1]  # noqa: E741
    plan = current_cost_model().gram_plan_for(C, N, T, O, I)
    cls = SampleBlockedFactor if plan == "pairwise" else ChannelSlicedFactor
    return cls(LazyColumns(backproped), a, source)


def linear_weight_grads(
    module: Linear, grad_output: Tensor, subsampling: list[int] | None
) -> OuterGrads | None:
    """Outer-product per-sample gradients of a linear weight (or ``None``)."""
    if not current_cost_model().factored:
        return None
    delta = subsample(grad_output, subsampling=subsampling)
    delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])
    a = linear_inputs(module, subsampling)
    return OuterGrads(delta, a, input_source(module, subsampling))


def conv_weight_grads(
    module: _ConvNd, grad_output: Tensor, subsampling: list[int] | None
) -> OuterGrads | None:
    """Outer-product per-sample gradients of a convolution weight (or ``None``)."""
    held = _take_handed_over(module)  # noqa: F841 - keeps the cached input alive
    if not conv_unfoldable(module) or not current_cost_model().factored:
        return None
    delta = subsample(grad_output, subsampling=subsampling)
    N, O = delta.shape[:2]  # noqa: E741
    delta = delta.reshape(N, O, -1).transpose(1, 2)
    a = conv_inputs(module, subsampling)
    # the per-sample gradients read the unfolded input whole, under any budget
    current_budget().note_excess(
        f"{type(module).__name__} (per-sample gradients: its unfolded input whole)",
        (delta.numel() + a.numel()) * a.element_size(),
    )
    return OuterGrads(delta, a, input_source(module, subsampling))


@dataclass(frozen=True)
class LayerRule:
    """How one layer kind hands its weight's factor and gradients to ``factors``.

    Attributes:
        sqrt_handler: BackPACK's square-root-GGN handler of the layer (its bias
            and the backpropagation to the layer input are kept).
        grads_handler: BackPACK's per-sample-gradient handler of the layer.
        weight_factor: ``(module, backproped, subsampling) -> Factor | None``.
        weight_grads: ``(module, grad_output, subsampling) -> Grads | None``.
        derivatives: Derivatives replacing BackPACK's in the square-root
            handler (same arithmetic, less memory), or ``None``.
    """

    sqrt_handler: type
    grads_handler: type
    weight_factor: Callable
    weight_grads: Callable
    derivatives: type | None = None


_LINEAR = (linear_weight_factor, linear_weight_grads)
_CONV = (conv_weight_factor, conv_weight_grads)

#: Layer kinds whose weights are kept factored (convolutions backpropagate the
#: factor to their input on column chunks, :data:`FAST_CONV_DERIVATIVES`; a
#: linear layer's ``Jᵀ`` may stay lazy under a budget, :mod:`.linear_backprop`).
FACTORED_LAYERS: dict[type, LayerRule] = {
    Linear: LayerRule(SqrtGGNLinear, BatchGradLinear, *_LINEAR, LazyLinearDerivatives),
    **{
        conv: LayerRule(sqrt, grads, *_CONV, FAST_CONV_DERIVATIVES[conv])
        for conv, sqrt, grads in (
            (Conv1d, SqrtGGNConv1d, BatchGradConv1d),
            (Conv2d, SqrtGGNConv2d, BatchGradConv2d),
            (Conv3d, SqrtGGNConv3d, BatchGradConv3d),
        )
    },
}
