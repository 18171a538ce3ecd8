"""Which layers keep ``V`` and per-sample gradients factored, and the cost model.

A new layer kind is one handler here plus one table line in
:mod:`vivitlib.extensions.backpack_ext`. Layers not listed use BackPACK's dense
``[C, N, *param.shape]`` factor for that layer only.

Cost model for a weight with ``T`` positions (1 for a plain linear layer), ``C``
columns per sample, ``N`` samples, output size ``O`` and input size ``I``
(``I = C_in · kernel size`` for convolutions), counting multiply-adds of the
Gram contribution:

* factored: ``(C·N·T)²·O + (N·T)²·I`` (pairwise position products), memory
  ``(C·N·T)²`` for the intermediate;
* dense: ``C·N·T·O·I`` to form ``V`` plus ``(C·N)²·O·I`` for ``VᵀV``, memory
  ``C·N·O·I``.

The factored path is taken when both its work and its memory are smaller.
Plain linear layers (``T = 1``) always qualify; convolutions qualify where the
output has few positions compared with the weight size (late layers).
"""

from __future__ import annotations

from backpack.utils.conv import unfold_input
from backpack.utils.subsampling import subsample
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

from vivitlib.extensions.factors import OuterFactor, OuterGrads

_ConvNd = Conv1d | Conv2d | Conv3d


def prefer_factored(C: int, N: int, T: int, O: int, I: int) -> bool:  # noqa: E741
    """Whether the outer-product path is cheaper in work and memory (see module doc)."""
    factored_work = (C * N * T) ** 2 * O + (N * T) ** 2 * I
    dense_work = C * N * T * O * I + (C * N) ** 2 * O * I
    factored_mem = (C * N * T) ** 2 + N * T * I
    dense_mem = C * N * O * I
    return factored_work <= dense_work and factored_mem <= dense_mem


def _conv_unfoldable(module: _ConvNd) -> bool:
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def linear_inputs(module: Linear, subsampling: list[int] | None) -> Tensor:
    """Layer input as ``[N, T, I]`` (extra input dimensions become positions)."""
    x = subsample(module.input0.detach(), subsampling=subsampling)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def conv_inputs(module: _ConvNd, subsampling: list[int] | None) -> Tensor:
    """Unfolded convolution input as ``[N, T, C_in·kernel]``."""
    x = subsample(module.input0.detach(), subsampling=subsampling)
    return unfold_input(module, x).transpose(1, 2)


def linear_weight_factor(
    module: Linear, backproped: Tensor, subsampling: list[int] | None
) -> OuterFactor:
    """Outer-product factor of a linear weight from ``[C, N, ..., O]``."""
    C, N, O = backproped.shape[0], backproped.shape[1], backproped.shape[-1]  # noqa: E741
    return OuterFactor(
        backproped.reshape(C, N, -1, O), linear_inputs(module, subsampling)
    )


def conv_weight_factor(
    module: _ConvNd, backproped: Tensor, subsampling: list[int] | None
) -> OuterFactor | None:
    """Outer-product factor of a convolution weight, or ``None`` if dense is cheaper."""
    if not _conv_unfoldable(module):
        return None
    C, N, O = backproped.shape[:3]  # noqa: E741
    T = backproped[0, 0, 0].numel()
    I = module.weight[0].numel()  # noqa: E741
    if not prefer_factored(C, N, T, O, I):
        return None
    s = backproped.reshape(C, N, O, T).transpose(2, 3)
    return OuterFactor(s, conv_inputs(module, subsampling))


def linear_weight_grads(
    module: Linear, grad_output: Tensor, subsampling: list[int] | None
) -> OuterGrads:
    """Outer-product per-sample gradients of a linear weight."""
    delta = subsample(grad_output, subsampling=subsampling)
    delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])
    return OuterGrads(delta, linear_inputs(module, subsampling))


def conv_weight_grads(
    module: _ConvNd, grad_output: Tensor, subsampling: list[int] | None
) -> OuterGrads | None:
    """Outer-product per-sample gradients of a convolution weight (or ``None``)."""
    if not _conv_unfoldable(module):
        return None
    delta = subsample(grad_output, subsampling=subsampling)
    N, O = delta.shape[:2]  # noqa: E741
    delta = delta.reshape(N, O, -1).transpose(1, 2)
    return OuterGrads(delta, conv_inputs(module, subsampling))


def is_conv(module: Module) -> bool:
    """Whether ``module`` is a (non-transposed) convolution."""
    return isinstance(module, (Conv1d, Conv2d, Conv3d))
