"""Faster square-root-GGN backpropagation through common layers, same numbers.

BackPACK backpropagates the GGN factor ``[C, N, *output]`` through an
element-wise activation with ``einsum("...,v...->v...", f'(x), mat)`` and
through max pooling by scattering into a zero buffer after ``einops``
rearrangements of the factor and the indices. The rules here do the same
arithmetic with plain broadcasting:

* activations (Sigmoid, Tanh, LeakyReLU, ELU, SELU, LogSigmoid):
  ``mat * f'(x)``; ReLU zeroes ``mat`` where ``x <= 0`` with autograd's own
  ReLU backward kernel (no mask tensor);
* Dropout: the factor itself in eval mode (the identity), ``mat * mask`` in
  train mode;
* max pooling: one ``scatter_add_`` into ``[C, N·channels, input pixels]``
  with the pooling indices expanded (not copied) over the ``C`` columns; the
  indices are the ones autograd saved in the forward pass
  (:mod:`.pool_indices`), recomputed only where the graph does not expose
  them (:mod:`.max_pool`). (A gather instead of the zero-filled buffer,
  possible for disjoint windows, was twice as slow: 3C3D-sized 2x2 pooling,
  128 vs 62 ms.)

(``Flatten`` keeps BackPACK's rule, a view.) The per-sample-gradient
extension backpropagates nothing through these layers.

**Lazy factors** (``max_memory=``, :mod:`vivitlib.memory`): every rule here
and the convolutions' ``Jᵀ`` (:mod:`.conv_backprop`) also exist as a pending
per-column map (``column_op``, which captures the mask, pooling indices or
weight it needs).
A factor that reaches a rule lazy (:class:`~vivitlib.extensions.lazy.LazyColumns`)
gets the map appended instead of being formed, and max pooling and
convolutions, whose outputs grow, start a lazy factor where their output
would exceed the budget's ``lazy_bytes`` (:func:`lazy_backpropagate`). The
maps can be narrowed to a range of output channels (``groups=1`` for
convolutions), so a consumer may also form a slice of channels alone, and
every map to a block of samples (``PendingOp.samples``: each acts on every
sample alone), so a column may be formed a block of samples at a time. A
ReLU appended after max pooling's scatter runs before it instead, on the
pooled values at their target pixels (:meth:`LazyColumns.then
<vivitlib.extensions.lazy.LazyColumns.then>`): the same products on a tensor a
quarter the size.

On the CPU most of the time of a large backpropagated factor goes into
touching freshly allocated memory, so the activation rules multiply **in
place** when nothing else can see the factor: the extension's ledger
(:class:`~vivitlib.extensions.ledger.QuantityLedger`, BackPACK's store of
backpropagated quantities, plus a record of the quantities a parameter's
factor may keep) confirms that no other stored or kept tensor shares its
memory (e.g. a residual sum hands one tensor to both branches), and the
tensor is contiguous and outside autograd.
Otherwise they compute out of place. Either way the numbers are BackPACK's.
Large outputs are allocated after handing free heap back (:mod:`.heap`).

:data:`FAST_SQRT` maps module classes to rules registered on the factor
extension through BackPACK's ``set_module_extension``.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
from backpack.core.derivatives.dropout import DropoutDerivatives
from backpack.core.derivatives.elu import ELUDerivatives
from backpack.core.derivatives.flatten import FlattenDerivatives
from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
from backpack.core.derivatives.logsigmoid import LogSigmoidDerivatives
from backpack.core.derivatives.maxpool1d import MaxPool1DDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from backpack.core.derivatives.maxpool3d import MaxPool3DDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from backpack.core.derivatives.selu import SELUDerivatives
from backpack.core.derivatives.sigmoid import SigmoidDerivatives
from backpack.core.derivatives.tanh import TanhDerivatives
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from vivitlib.extensions.lazy import LazyColumns, PendingOp, input_shape
from vivitlib.extensions.ledger import may_overwrite
from vivitlib.extensions.max_pool import fast_max_pool
from vivitlib.memory import current_budget


def _scaling(factor: Tensor):
    def scale(x: Tensor, fresh: bool) -> Tensor:
        return x.mul_(factor) if fresh else x * factor

    return scale


def scale_op(factor: Tensor, at=None) -> PendingOp:
    """Pending ``x * factor`` (``factor`` ``[N, *features]``), in place when fresh.

    ``factor`` may be an expanded view (a per-channel scale). ``at``: the map
    at gathered positions (``PendingOp.at``); default: ``factor`` gathered.
    """

    def narrow(o0: int, o1: int):
        return _scaling(factor[:, o0:o1]), (o0, o1)

    def samples(n0: int, n1: int):
        return _scaling(factor[n0:n1])

    def gathered(index: Tensor, shape: tuple[int, ...]) -> PendingOp:
        return scale_op(factor.flatten(2).gather(2, index).view(shape))

    return PendingOp(
        _scaling(factor),
        tuple(factor.shape),
        fresh=True,
        narrow=narrow,
        at=gathered if at is None else at,
        samples=samples,
    )


def _elementwise(base: type) -> type:
    """``base`` with ``Jᵀ mat = mat * f'(x)`` instead of an einsum."""

    class _Fast(base):
        def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
            return mat * self.df(module, g_inp, g_out, subsampling=subsampling)

        def jac_t_mat_prod_(self, module, mat: Tensor, subsampling=None) -> Tensor:
            """The same product written into ``mat``."""
            return mat.mul_(self.df(module, None, None, subsampling=subsampling))

        def column_op(self, module, subsampling=None) -> PendingOp | None:
            """The product as a pending map on a lazy factor's columns."""
            return scale_op(self.df(module, None, None, subsampling=subsampling))

    _Fast.__name__ = f"Fast{base.__name__}"
    return _Fast


class FastReLUDerivatives(ReLUDerivatives):
    """ReLU: zero where ``x <= 0`` with autograd's ReLU backward kernel.

    ``threshold_backward(mat, x, 0)`` (a core ATen operator) reads the layer
    input itself: no mask is formed, and multiplying by a bool mask (a slow,
    casting loop on the CPU: 4x the time on 3C3D's first ReLU) is avoided.
    Without sub-sampling the input is BackPACK's stored tensor (no copy). For
    finite inputs the numbers are BackPACK's ``mat * (x > 0)``, up to the sign
    of zeros (at a NaN input autograd's kernel passes ``mat`` through where
    BackPACK gives 0; the pass refuses non-finite results either way).
    """

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        return _relu_masking(_relu_input(module, subsampling))(mat, False)

    def jac_t_mat_prod_(self, module, mat: Tensor, subsampling=None) -> Tensor:
        """The same product written into ``mat``."""
        return _relu_masking(_relu_input(module, subsampling))(mat, True)

    def column_op(self, module, subsampling=None) -> PendingOp | None:
        """The product as a pending map on a lazy factor's columns."""
        return _relu_op(_relu_input(module, subsampling))


def _relu_op(x: Tensor) -> PendingOp:
    """Pending ReLU ``Jᵀ`` for the layer input ``x`` ``[N, channels, ...]``."""

    def narrow(o0: int, o1: int):
        return _relu_masking(x[:, o0:o1]), (o0, o1)

    def at(index: Tensor, shape: tuple[int, ...]) -> PendingOp:
        return _relu_op(x.flatten(2).gather(2, index).view(shape))

    def samples(n0: int, n1: int):
        return _relu_masking(x[n0:n1])

    return PendingOp(
        _relu_masking(x),
        tuple(x.shape),
        fresh=True,
        narrow=narrow,
        at=at,
        samples=samples,
    )


def _relu_input(module: nn.Module, subsampling: list[int] | None) -> Tensor:
    return subsample(module.input0, subsampling=subsampling).detach()


def _relu_masking(x: Tensor):
    """``mat -> mat * (x > 0)`` for ``mat`` ``[V, *x.shape]`` (in place when fresh)."""
    threshold_backward = torch.ops.aten.threshold_backward

    def mask(mat: Tensor, fresh: bool) -> Tensor:
        inp = x.expand_as(mat)
        if fresh:
            return threshold_backward.grad_input(mat, inp, 0, grad_input=mat)
        return threshold_backward(mat, inp, 0)

    return mask


class FastDropoutDerivatives(_elementwise(DropoutDerivatives)):
    """Dropout: the identity in eval mode, ``mat * mask / (1 - p)`` in train mode."""

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        if not module.training or module.p == 0:
            return mat
        return super()._jac_t_mat_prod(
            module, g_inp, g_out, mat, subsampling=subsampling
        )

    def jac_t_mat_prod_(self, module, mat: Tensor, subsampling=None) -> Tensor:
        """The same product written into ``mat``."""
        if not module.training or module.p == 0:
            return mat
        return super().jac_t_mat_prod_(module, mat, subsampling=subsampling)

    def column_op(self, module, subsampling=None) -> PendingOp | None:
        """The product as a pending map (``None``: the identity)."""
        if not module.training or module.p == 0:
            return None
        return super().column_op(module, subsampling=subsampling)


class FastFlattenDerivatives(FlattenDerivatives):
    """Flatten: BackPACK's view; on a lazy factor a pending reshape."""

    def column_op(self, module, subsampling=None) -> PendingOp | None:
        """The reshape as a pending map on a lazy factor's columns."""
        shape = input_shape(module, subsampling)

        def unflatten(x: Tensor, fresh: bool) -> Tensor:
            return x.reshape(x.shape[0], *shape)

        def samples(n0: int, n1: int):
            def block(x: Tensor, fresh: bool) -> Tensor:
                return x.reshape(x.shape[0], n1 - n0, *shape[1:])

            return block

        def narrow(o0: int, o1: int):
            def part(x: Tensor, fresh: bool) -> Tensor:
                return x.reshape(x.shape[0], shape[0], o1 - o0, *shape[2:])

            per_channel = prod(shape[2:])
            return part, (o0 * per_channel, o1 * per_channel)

        return PendingOp(
            unflatten, tuple(shape), fresh=False, narrow=narrow, samples=samples
        )


#: Module class -> fast derivatives (same arithmetic as BackPACK's).
FAST_DERIVATIVES: dict[type[nn.Module], type] = {
    nn.ReLU: FastReLUDerivatives,
    nn.Sigmoid: _elementwise(SigmoidDerivatives),
    nn.Tanh: _elementwise(TanhDerivatives),
    nn.LeakyReLU: _elementwise(LeakyReLUDerivatives),
    nn.ELU: _elementwise(ELUDerivatives),
    nn.SELU: _elementwise(SELUDerivatives),
    nn.LogSigmoid: _elementwise(LogSigmoidDerivatives),
    nn.Dropout: FastDropoutDerivatives,
    nn.MaxPool1d: fast_max_pool(MaxPool1DDerivatives),
    nn.MaxPool2d: fast_max_pool(MaxPool2DDerivatives),
    nn.MaxPool3d: fast_max_pool(MaxPool3DDerivatives),
    nn.Flatten: FastFlattenDerivatives,
}


def _sqrt_rule(derivatives_cls: type) -> type:
    class _Rule(SqrtGGNBaseModule):
        def __init__(self):
            super().__init__(derivatives_cls())

        def accepts_lazy(self, ext, module, quantity: LazyColumns) -> bool:
            """Every rule here appends its map to a lazy factor."""
            return True

        def backpropagate(self, ext, module, g_inp, g_out, backproped):
            subsampling = ext.get_subsampling()
            lazy = lazy_backpropagate(self.derivatives, module, backproped, subsampling)
            if lazy is not None:
                return lazy
            in_place = getattr(self.derivatives, "jac_t_mat_prod_", None)
            if in_place is not None and may_overwrite(ext, backproped):
                return in_place(module, backproped, subsampling=subsampling)
            return super().backpropagate(ext, module, g_inp, g_out, backproped)

    _Rule.__name__ = f"SqrtGGN{derivatives_cls.__name__}"
    return _Rule


def lazy_backpropagate(
    derivatives: Any, module: nn.Module, mat: Any, subsampling: list[int] | None
) -> LazyColumns | None:
    """``Jᵀ mat`` kept lazy, or ``None`` to compute it as usual.

    A lazy ``mat`` gets the layer's map appended (``column_op``); a formed one
    becomes lazy where the layer's output grows beyond the budget's
    :attr:`~vivitlib.memory.MemoryBudget.lazy_bytes` (``derivatives.grows``: a
    flag, or a predicate on the module).
    """
    if isinstance(mat, LazyColumns):
        op = derivatives.column_op(module, subsampling=subsampling)
        return mat if op is None else mat.then(op)
    grows = getattr(derivatives, "grows", False)
    if callable(grows):
        grows = grows(module)
    if not grows or not isinstance(mat, Tensor):
        return None
    out_numel = mat.shape[0] * prod(input_shape(module, subsampling))
    if not current_budget().keeps_lazy(out_numel * mat.element_size()):
        return None
    op = derivatives.column_op(module, subsampling=subsampling)
    return LazyColumns(mat).then(op)


#: Module class -> square-root-GGN rule replacing BackPACK's.
FAST_SQRT = {cls: _sqrt_rule(d) for cls, d in FAST_DERIVATIVES.items()}


def jac_t_mat_prod(
    module: nn.Module, mat: Tensor, subsampling: list[int] | None = None
) -> Tensor:
    """Apply the fast rule of ``module`` (after a BackPACK-extended forward).

    Args:
        module: One of the classes in :data:`FAST_DERIVATIVES`.
        mat: ``[V, N, *module.output.shape[1:]]``.
        subsampling: Sample indices ``mat`` belongs to (``None``: all).

    Returns:
        ``[V, N, *module.input0.shape[1:]]``.
    """
    derivatives = FAST_DERIVATIVES[type(module)]()
    with torch.no_grad():
        return derivatives.jac_t_mat_prod(
            module, None, None, mat, subsampling=subsampling
        )
