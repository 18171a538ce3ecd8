"""Convolutions' transposed Jacobian on column chunks, and as a pending map.

The factored convolution handlers (:mod:`.layers`) backpropagate the factor to
the layer input with :data:`FAST_CONV_DERIVATIVES`: BackPACK's own product,
computed a few columns at a time (bounded ``conv_transpose`` scratch), and --
for lazy factors (:mod:`.lazy`) -- as a pending map on a snapshot of the
module (``column_op``), narrowable to a range of input channels for
``groups=1`` and to a block of samples (any ``groups``).
"""

from __future__ import annotations

import copy
from typing import Any

from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from torch import Tensor, nn

from vivitlib.extensions import heap
from vivitlib.extensions.lazy import PendingOp, input_shape
from vivitlib.memory import current_budget

#: A convolution's transposed Jacobian runs on column chunks of at most this
#: many output bytes (``conv_transpose`` needs scratch proportional to its
#: batch), or of the budget's ``column_bytes`` where that is smaller.
CONV_CHUNK_BYTES = 8 * 2**20


class _ConvSnapshot:
    """What BackPACK's convolution ``Jᵀ`` reads from a module, kept past its step.

    The input is a shape only (a zero-stride view of one zero), the weight is
    detached; BackPACK frees the module's stored input after its step.
    """

    _FIELDS = ("stride", "padding", "kernel_size", "dilation", "groups")

    def __init__(self, module: Any):
        for name in self._FIELDS:
            setattr(self, name, getattr(module, name))
        self.weight = module.weight.detach()
        self.input0 = module.input0.new_zeros(()).expand(module.input0.shape)

    def narrowed(self, o0: int, o1: int) -> _ConvSnapshot:
        """The same layer restricted to input channels ``o0:o1`` (``groups=1``)."""
        part = copy.copy(self)
        part.weight = self.weight[:, o0:o1]
        shape = list(self.input0.shape)
        shape[1] = o1 - o0
        part.input0 = self.input0[:1, :1].expand(shape)
        return part

    def sampled(self, samples: int) -> _ConvSnapshot:
        """The same layer for an input of ``samples`` samples (a block of them)."""
        part = copy.copy(self)
        shape = list(self.input0.shape)
        shape[0] = samples
        part.input0 = self.input0[:1].expand(shape)
        return part


def _column_chunked(base: type) -> type:
    """``base`` (a convolution) with ``Jᵀ mat`` computed a few columns at a time.

    BackPACK runs one ``conv_transpose`` on all ``V·N`` columns and samples at
    once, whose scratch is about as large as its output; in chunks of columns it
    stays a few MiB (3C3D, ``N = 64``: 34 instead of 65 MiB above the input for
    the second convolution, same time), and the free heap is released after the
    chunks (see :mod:`.heap`). Every chunk is BackPACK's own product.
    """

    class _Fast(base):
        #: The output is usually larger than the input: worth keeping lazy.
        grows = True

        def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
            V = mat.shape[0]
            column_bytes = mat.shape[1] * module.input0[0].numel() * mat.element_size()
            chunk_bytes = min(CONV_CHUNK_BYTES, current_budget().column_bytes)
            step = max(1, chunk_bytes // max(column_bytes, 1))
            if step >= V:
                return super()._jac_t_mat_prod(module, g_inp, g_out, mat, subsampling)
            out = None
            for c0 in range(0, V, step):
                part = super()._jac_t_mat_prod(
                    module, g_inp, g_out, mat[c0 : c0 + step], subsampling
                )
                if out is None:
                    out = part.new_empty(V, *part.shape[1:])
                out[c0 : c0 + step] = part
            del part
            if out.device.type == "cpu":  # the chunks' scratch went back to the heap
                heap.release_free_heap()
            return out

        def column_op(self, module, subsampling=None) -> PendingOp:
            """``Jᵀ`` as a pending map (BackPACK's product on a module snapshot)."""
            shape = input_shape(module, subsampling)
            jac_t = super()._jac_t_mat_prod
            whole = _ConvSnapshot(module)

            def transposed(snapshot: _ConvSnapshot, kept: list[int] | None):
                def transpose_conv(x: Tensor, fresh: bool) -> Tensor:
                    return jac_t(snapshot, None, None, x, kept)

                return transpose_conv

            def narrow(o0: int, o1: int):
                return transposed(whole.narrowed(o0, o1), subsampling), None

            def samples(n0: int, n1: int):
                # the block's own sample count; BackPACK reads it from input0
                return transposed(whole.sampled(n1 - n0), None)

            return PendingOp(
                transposed(whole, subsampling),
                tuple(shape),
                fresh=True,
                narrow=narrow if module.groups == 1 else None,
                samples=samples,
            )

    _Fast.__name__ = f"Chunked{base.__name__}"
    return _Fast


#: Convolution class -> derivatives whose ``Jᵀ`` runs on column chunks; for the
#: factored convolution handlers (which keep BackPACK's for the weight).
FAST_CONV_DERIVATIVES: dict[type[nn.Module], type] = {
    nn.Conv1d: _column_chunked(Conv1DDerivatives),
    nn.Conv2d: _column_chunked(Conv2DDerivatives),
    nn.Conv3d: _column_chunked(Conv3DDerivatives),
}
