"""Eval-mode batch normalisation for the GGN factor: a scale per channel, lazy-aware.

With stored statistics, batch normalisation is the affine map
``y = γ x̂ + β``, ``x̂ = (x - μ) / √(σ² + ε)``. Its transposed Jacobian scales
channel ``c`` of the factor by ``γ_c / √(σ²_c + ε)`` (BackPACK: an ``einsum``
into a new tensor), and the factors of ``γ`` and ``β`` are the per-sample
channel sums of the backpropagated factor, weighted by ``x̂`` and unweighted.

The rule here computes the same numbers with a broadcast multiply, and takes a
lazy factor (:class:`~vivitlib.extensions.lazy.LazyColumns`: the large factor
behind max pooling in Conv-BN-ReLU-MaxPool stacks, or any factor under
``max_memory``) without forming it: the scale is appended as one more pending
map -- which, like ReLU's, runs ahead of max pooling's scatter on the pooled
values -- and both sums are taken a column chunk at a time, ahead of a
trailing scatter (which keeps per-channel sums; ``x̂`` is gathered at the
pooling targets). Before, such a factor was formed whole at every batch norm
layer, copied and scaled into a second whole tensor.

Train mode keeps BackPACK's rule (the collector refuses train-mode batch norm,
and batch norm without running statistics, before the pass: batch statistics
couple the samples). Unlike BackPACK's rule, this one also runs batch norm
without affine parameters (``affine=False``: ``γ = 1``, no factors).
"""

from __future__ import annotations

from typing import Any

import torch
from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
from backpack.extensions.secondorder.sqrt_ggn.batchnorm_nd import SqrtGGNBatchNormNd
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from vivitlib.extensions.fast_backprop import scale_op
from vivitlib.extensions.lazy import LazyColumns, PendingOp, StepResults, input_shape


def channel_scale(module: nn.Module) -> Tensor:
    """``γ / √(σ² + ε)`` per channel (BackPACK's expression, same numbers).

    Without affine parameters (``affine=False``, which BackPACK's rule
    refuses) ``γ = 1``.
    """
    scale = (module.running_var + module.eps) ** (-0.5)
    if module.weight is not None:
        scale = scale * module.weight
    return scale.detach()


def channel_scale_op(scale: Tensor, shape: tuple[int, ...]) -> PendingOp:
    """Pending ``x * scale[channel]`` for columns ``[N, channels, ...]`` of ``shape``.

    The scale is an expanded view (no tensor of ``shape`` is formed); at
    gathered positions (ahead of a scatter) it is the same scale.
    """
    view = scale.view(1, -1, *([1] * (len(shape) - 2))).expand(shape)

    def at(index: Tensor, gathered: tuple[int, ...]) -> PendingOp:
        return channel_scale_op(scale, gathered)

    return scale_op(view, at=at)


class FastBatchNormDerivatives(BatchNormNdDerivatives):
    """Eval mode: ``Jᵀ mat`` as a broadcast multiply, and as a pending map."""

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        if module.training:
            return super()._jac_t_mat_prod(
                module, g_inp, g_out, mat, subsampling=subsampling
            )
        shape = mat.shape[1:2] + module.input0.shape[1:]
        return channel_scale_op(channel_scale(module), shape).fn(mat, False)

    def column_op(self, module, subsampling=None) -> PendingOp:
        """The scale as a pending map on a lazy factor's columns (eval mode)."""
        shape = tuple(input_shape(module, subsampling))
        return channel_scale_op(channel_scale(module), shape)

    @staticmethod
    def normalized_input(module, subsampling=None) -> Tensor:
        """``x̂`` of the kept samples, ``[N, channels, ...]`` (eval mode).

        BackPACK's expression, on the kept samples only.
        """
        x = subsample(module.input0, subsampling=subsampling).detach()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = module.running_mean.view(shape), module.running_var.view(shape)
        return (x - mean) / (var + module.eps).sqrt()


def lazy_channel_sums(
    lazy: LazyColumns, x_hat: Tensor | None, bias: bool
) -> dict[str, Tensor]:
    """Per-sample channel sums of a lazy factor, ``[C, N, channels]`` each.

    ``'weight'``: ``Σ x̂ · L`` over each channel's features (if ``x_hat`` is
    given); ``'bias'``: ``Σ L`` (if ``bias``). One pass over column chunks;
    a trailing scatter (max pooling's ``Jᵀ``) is left out and ``x̂`` gathered
    at its targets instead.
    """
    last = lazy.ops[-1] if lazy.ops else None
    if last is not None and last.scatter is not None:
        lazy = LazyColumns(lazy.source, lazy.ops[:-1])
        if x_hat is not None:
            x_hat = x_hat.flatten(2).gather(2, last.scatter)
    C, N, channels = lazy.shape[:3]  # noqa: E741
    if x_hat is not None:
        x_hat = x_hat.reshape(N, channels, -1)
    sums: dict[str, Tensor] = {}
    if x_hat is not None:
        sums["weight"] = lazy.source.new_empty(C, N, channels)
    if bias:
        sums["bias"] = lazy.source.new_empty(C, N, channels)
    # the weighted sum forms a product as large as the chunk
    weighted = 1 if x_hat is None else 2
    for c0, c1 in lazy.chunks(weighted * lazy.column_bytes()):
        part = lazy.columns(c0, c1).reshape(c1 - c0, N, channels, -1)
        if bias:
            torch.sum(part, dim=3, out=sums["bias"][c0:c1])
        if x_hat is not None:
            torch.sum(part * x_hat, dim=3, out=sums["weight"][c0:c1])
    return sums


def _wanted(ext: Any, param: Tensor | None) -> bool:
    wants = getattr(ext, "wants", None)
    return param is not None and param.requires_grad and (wants is None or wants(param))


class SqrtGGNBatchNorm(SqrtGGNBatchNormNd):
    """BackPACK's batch norm rule for the factor, with the eval-mode paths above."""

    def __init__(self):
        super().__init__()
        self.derivatives = FastBatchNormDerivatives()
        self._formed = {
            name: self._make_param_function(name) for name in ("weight", "bias")
        }
        self._lazy = StepResults()

    def accepts_lazy(self, ext, module, quantity: LazyColumns) -> bool:
        """Eval mode takes a lazy factor (train mode is refused before the pass)."""
        return not module.training

    def _factor(self, name: str, ext, module, g_inp, g_out, backproped):
        """``name``'s factor: channel sums of a lazy factor (both on the first ask)."""
        if not _wanted(ext, getattr(module, name)):
            return None
        if not isinstance(backproped, LazyColumns):
            return self._formed[name](ext, module, g_inp, g_out, backproped)

        def compute() -> dict[str, Tensor]:
            x_hat = None
            if _wanted(ext, module.weight):
                x_hat = self.derivatives.normalized_input(module, ext.get_subsampling())
            return lazy_channel_sums(backproped, x_hat, _wanted(ext, module.bias))

        return self._lazy.take(backproped, name, compute)

    def weight(self, ext, module, g_inp, g_out, backproped):  # noqa: D102
        return self._factor("weight", ext, module, g_inp, g_out, backproped)

    def bias(self, ext, module, g_inp, g_out, backproped):  # noqa: D102
        return self._factor("bias", ext, module, g_inp, g_out, backproped)

    def backpropagate(self, ext, module, g_inp, g_out, backproped):  # noqa: D102
        if isinstance(backproped, LazyColumns):
            sub = ext.get_subsampling()
            return backproped.then(self.derivatives.column_op(module, sub))
        return super().backpropagate(ext, module, g_inp, g_out, backproped)


#: Module class -> square-root-GGN rule replacing BackPACK's.
BATCH_NORM_SQRT = {
    cls: SqrtGGNBatchNorm for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}
