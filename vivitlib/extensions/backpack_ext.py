"""BackPACK extensions that collect factored ``V`` and per-sample gradients.

Both subclass BackPACK's own (``SqrtGGN`` and ``BatchGrad``), swap in factored
handlers for linear and convolution weights (and, for the factor, the faster
backpropagation rules of :mod:`.fast_backprop`), save under private attribute
names, and report every module they reach to their owner so it can validate
the pass and roll back on failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from backpack.extensions import BatchGrad
from backpack.extensions.firstorder.batch_grad.conv1d import BatchGradConv1d
from backpack.extensions.firstorder.batch_grad.conv2d import BatchGradConv2d
from backpack.extensions.firstorder.batch_grad.conv3d import BatchGradConv3d
from backpack.extensions.firstorder.batch_grad.linear import BatchGradLinear
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from backpack.extensions.secondorder.sqrt_ggn.convnd import (
    SqrtGGNConv1d,
    SqrtGGNConv2d,
    SqrtGGNConv3d,
)
from backpack.extensions.secondorder.sqrt_ggn.linear import SqrtGGNLinear
from backpack.utils.module_classification import is_loss
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

from vivitlib.extensions import layers
from vivitlib.extensions.extra_layers import EXTRA_SQRT
from vivitlib.extensions.fast_backprop import FAST_SQRT, QuantityLedger

FACTOR_FIELD = "_vivitlib_ggn_factor"
GRADS_FIELD = "_vivitlib_batch_grads"


class PassOwner(Protocol):
    """What the extensions need from the object collecting their results."""

    def run_extension(
        self, call: Callable[..., None], module: Module, g_inp: Any, g_out: Any
    ) -> None:
        """Validate ``module``, run ``call``, roll back on failure."""


def _factored_sqrt(base: type, build: Callable) -> type:
    """BackPACK's factor handler ``base``; the weight's factor from ``build``."""

    class _FactoredSqrt(base):
        def weight(self, ext, module, g_inp, g_out, backproped: Tensor):  # noqa: D102
            subsampling = ext.get_subsampling()
            factor = build(module, backproped, subsampling)
            if factor is not None:
                return factor
            return self.derivatives.param_mjp(
                "weight", module, g_inp, g_out, backproped,
                sum_batch=False, subsampling=subsampling,
            )  # fmt: skip

    _FactoredSqrt.__name__ = f"Factored{base.__name__}"
    return _FactoredSqrt


def _factored_grads(base: type, build: Callable) -> type:
    """BackPACK's per-sample-gradient handler ``base``, weight from ``build(...)``."""

    class _FactoredGrads(base):
        def __init__(self):
            super().__init__()
            self._dense_weight = self._make_param_function("weight")

        def weight(self, ext, module, g_inp, g_out, bp_quantities):  # noqa: D102
            grads = build(module, g_out[0], ext.get_subsampling())
            if grads is not None:
                return grads
            return self._dense_weight(ext, module, g_inp, g_out, bp_quantities)

    _FactoredGrads.__name__ = f"Factored{base.__name__}"
    return _FactoredGrads


#: Module class -> factored handler, for the GGN factor and per-sample gradients.
FACTORED_SQRT = {
    Linear: _factored_sqrt(SqrtGGNLinear, layers.linear_weight_factor),
    Conv1d: _factored_sqrt(SqrtGGNConv1d, layers.conv_weight_factor),
    Conv2d: _factored_sqrt(SqrtGGNConv2d, layers.conv_weight_factor),
    Conv3d: _factored_sqrt(SqrtGGNConv3d, layers.conv_weight_factor),
}
FACTORED_GRADS = {
    Linear: _factored_grads(BatchGradLinear, layers.linear_weight_grads),
    Conv1d: _factored_grads(BatchGradConv1d, layers.conv_weight_grads),
    Conv2d: _factored_grads(BatchGradConv2d, layers.conv_weight_grads),
    Conv3d: _factored_grads(BatchGradConv3d, layers.conv_weight_grads),
}


class GGNFactorExtension(SqrtGGN):
    """GGN factor ``V`` (exact or Monte-Carlo, optionally sub-sampled), factored.

    Args:
        owner: Receives every module call (validation, roll-back).
        mc_samples: 0 for the exact loss-Hessian factor, ``m > 0`` for ``m``
            Monte-Carlo samples.
        subsampling: Sample indices whose columns are kept (``None``: all).
    """

    def __init__(
        self, owner: PassOwner, mc_samples: int, subsampling: list[int] | None
    ):
        strategy = (
            LossHessianStrategy.EXACT
            if mc_samples == 0
            else LossHessianStrategy.SAMPLING
        )
        super().__init__(strategy, FACTOR_FIELD, subsampling)
        self._mc_samples = mc_samples
        self._owner = owner
        rules = {**EXTRA_SQRT, **FAST_SQRT, **FACTORED_SQRT}
        for module_cls, handler in rules.items():
            self.set_module_extension(module_cls, handler(), overwrite=True)
        self.saved_quantities = QuantityLedger()

    def get_num_mc_samples(self) -> int:
        """Number of Monte-Carlo samples of the loss Hessian factor."""
        return self._mc_samples

    def __call__(self, module: Module, g_inp, g_out) -> None:  # noqa: D102
        self._owner.run_extension(self._call, module, g_inp, g_out)

    def _call(self, module: Module, g_inp, g_out) -> None:
        if is_loss(module):
            # a pass starts: quantities left by an aborted one (keyed by memory
            # addresses that new tensors may reuse) must not be accumulated onto
            self.saved_quantities.clear()
        elif any(p.requires_grad for p in module.parameters(recurse=False)):
            # its factors may keep the quantity: never overwrite it in place
            self.saved_quantities.pin(module.output.data_ptr())
        super().__call__(module, g_inp, g_out)


class BatchGradsExtension(BatchGrad):
    """Per-sample gradients, factored for linear and convolution weights.

    Args:
        owner: Receives every module call (validation, roll-back).
        subsampling: Sample indices to keep (``None``: all).
    """

    def __init__(self, owner: PassOwner, subsampling: list[int] | None):
        super().__init__(subsampling=subsampling)
        self.savefield = GRADS_FIELD
        self._owner = owner
        for module_cls, handler in FACTORED_GRADS.items():
            self.set_module_extension(module_cls, handler(), overwrite=True)

    def __call__(self, module: Module, g_inp, g_out) -> None:  # noqa: D102
        self._owner.run_extension(super().__call__, module, g_inp, g_out)
