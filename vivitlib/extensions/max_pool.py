"""Max pooling's transposed Jacobian: one scatter, indices from autograd.

The rule of :data:`~vivitlib.extensions.fast_backprop.FAST_DERIVATIVES` for
max pooling: one ``scatter_add_`` into a zero buffer ``[C, N·channels, input
pixels]`` with the pooling indices expanded (not copied) over the ``C``
columns, the indices autograd saved (:mod:`.pool_indices`) where it exposes
them, and -- for lazy factors -- the scatter as a pending map that a
following element-wise map may run ahead of (``PendingOp.scatter``).
"""

from __future__ import annotations

from math import prod

from torch import Tensor

from vivitlib.extensions.heap import new_zeros
from vivitlib.extensions.lazy import PendingOp
from vivitlib.extensions.pool_indices import saved_indices


def fast_max_pool(base: type) -> type:
    """``base`` with one scatter over flattened pixels, indices expanded not copied."""

    class _Fast(base):
        #: The output is larger than the input: worth keeping lazy.
        grows = True

        def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
            return self.column_op(module, subsampling).fn(mat, False)

        def get_pooling_idx(self, module, subsampling=None) -> Tensor:
            """Autograd's saved indices where offered, else BackPACK's recomputation."""
            indices = saved_indices(module, subsampling)
            if indices is not None:
                return indices
            return super().get_pooling_idx(module, subsampling=subsampling)

        def column_op(self, module, subsampling=None) -> PendingOp:
            """The scatter as a pending map (captures the pooling indices)."""
            index = self.get_pooling_idx(module, subsampling=subsampling)
            N, channels = index.shape[:2]
            in_shape = tuple(module.input0.shape[2:])
            index = index.reshape(N, channels, -1)

            def narrow(o0: int, o1: int):
                return _unpooling(index[:, o0:o1], in_shape), (o0, o1)

            def samples(n0: int, n1: int):
                return _unpooling(index[n0:n1], in_shape)

            return PendingOp(
                _unpooling(index, in_shape),
                (N, channels, *in_shape),
                fresh=True,
                narrow=narrow,
                scatter=index,
                samples=samples,
            )

    _Fast.__name__ = f"Fast{base.__name__}"
    return _Fast


def _unpooling(index: Tensor, in_shape: tuple[int, ...]):
    """Max pooling's ``Jᵀ`` for pooling indices ``[N, channels, out pixels]``."""
    N, channels = index.shape[:2]
    flat = index.reshape(1, N * channels, -1)

    def unpool(x: Tensor, fresh: bool) -> Tensor:
        V = x.shape[0]
        out = new_zeros(x, V, N * channels, prod(in_shape))
        out.scatter_add_(2, flat.expand(V, -1, -1), x.reshape(V, N * channels, -1))
        return out.view(V, N, channels, *in_shape)

    return unpool
