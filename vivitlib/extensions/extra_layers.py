"""Square-root-GGN rules for layers BackPACK's ``SqrtGGN`` table lacks.

BackPACK ships the derivatives of these layers (used by its other second-order
extensions) but does not register them for the square-root GGN; registering
them here lets, e.g., torchvision's ResNets (``AdaptiveAvgPool2d``) through.
The cross-entropy rule of :mod:`vivitlib.extensions.losses` replaces BackPACK's
so that class weights, ``ignore_index`` and label smoothing are exact, and the
average-pooling rules replace BackPACK's (which build a helper convolution in
the global default dtype and ignore ``ceil_mode``/``divisor_override``).
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.adaptive_avg_pool_nd import (
    AdaptiveAvgPool1dDerivatives,
    AdaptiveAvgPool2dDerivatives,
    AdaptiveAvgPool3dDerivatives,
)
from backpack.core.derivatives.avgpool1d import AvgPool1DDerivatives
from backpack.core.derivatives.avgpool2d import AvgPool2DDerivatives
from backpack.core.derivatives.avgpool3d import AvgPool3DDerivatives
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor
from torch.nn import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    Module,
)

from vivitlib.extensions.losses import LOSS_SQRT


def _sqrt_rule(derivatives_cls: type) -> type:
    class _Rule(SqrtGGNBaseModule):
        def __init__(self):
            super().__init__(derivatives_cls())

    _Rule.__name__ = f"SqrtGGN{derivatives_cls.__name__.replace('Derivatives', '')}"
    return _Rule


def _pool_tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def avg_pool_transpose(
    mat: Tensor,
    in_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    options: tuple[bool, bool, int | None] = (False, True, None),
) -> Tensor:
    """Apply the transposed Jacobian of an average pooling to ``mat``.

    Pooling is linear, so this is the adjoint of the pooling map itself,
    computed by ATen's pooling backward kernel with the layer's exact options
    and in ``mat``'s dtype (no helper convolution in the default dtype).

    Args:
        mat: ``[V, N, C, *out_spatial]``.
        in_shape: The layer input's spatial shape.
        kernel: Kernel size per spatial axis (1, 2 or 3 axes).
        stride: Stride per axis.
        padding: Padding per axis.
        options: ``(ceil_mode, count_include_pad, divisor_override)``.

    Returns:
        ``[V, N, C, *in_shape]``.
    """
    V, N, C = mat.shape[:3]
    out = mat.reshape(V * N, C, *mat.shape[3:])
    dims = len(kernel)
    if dims == 1:  # ATen pools 1-D inputs as 2-D images of height 1
        out, spatial = out.unsqueeze(2), (1, *in_shape)
        kernel, stride, padding = (1, *kernel), (1, *stride), (0, *padding)
    else:
        spatial = tuple(in_shape)
    shape_only = mat.new_zeros(()).expand(V * N, C, *spatial)
    backward = (
        torch.ops.aten.avg_pool3d_backward
        if dims == 3
        else torch.ops.aten.avg_pool2d_backward
    )
    result = backward(
        out.contiguous(),
        shape_only,
        list(kernel),
        list(stride),
        list(padding),
        *options,
    )
    return result.reshape(V, N, C, *in_shape)


def _exact_avg_pool(base: type, dims: int, adaptive: bool = False) -> type:
    class _Derivatives(base):
        if not adaptive:

            def check_parameters(self, module: Module) -> None:
                """Every option is handled exactly by :func:`avg_pool_transpose`."""

        def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
            in_shape = tuple(module.input0.shape[2:])
            if adaptive:
                self.check_parameters(module)
                stride, kernel, padding = self.get_avg_pool_parameters(module)
                options = (False, True, None)
            else:
                kernel = module.kernel_size
                stride = module.stride or module.kernel_size
                padding = module.padding
                options = (
                    module.ceil_mode,
                    module.count_include_pad,
                    getattr(module, "divisor_override", None),
                )
            return avg_pool_transpose(
                mat,
                in_shape,
                _pool_tuple(kernel, dims),
                _pool_tuple(stride, dims),
                _pool_tuple(padding, dims),
                options,
            )

    _Derivatives.__name__ = f"Exact{base.__name__}"
    return _Derivatives


#: Module class -> square-root-GGN rule added on top of BackPACK's table.
EXTRA_SQRT = {
    AdaptiveAvgPool1d: _sqrt_rule(
        _exact_avg_pool(AdaptiveAvgPool1dDerivatives, 1, adaptive=True)
    ),
    AdaptiveAvgPool2d: _sqrt_rule(
        _exact_avg_pool(AdaptiveAvgPool2dDerivatives, 2, adaptive=True)
    ),
    AdaptiveAvgPool3d: _sqrt_rule(
        _exact_avg_pool(AdaptiveAvgPool3dDerivatives, 3, adaptive=True)
    ),
    AvgPool1d: _sqrt_rule(_exact_avg_pool(AvgPool1DDerivatives, 1)),
    AvgPool2d: _sqrt_rule(_exact_avg_pool(AvgPool2DDerivatives, 2)),
    AvgPool3d: _sqrt_rule(_exact_avg_pool(AvgPool3DDerivatives, 3)),
    **LOSS_SQRT,
}
