"""Chunked contractions of outer-product factors, with bounded intermediates.

For a weight with backpropagated factor ``s`` ``[C, N, T, O]`` and layer input
``a`` ``[N, T, I]`` (``T`` positions), column ``(c, n)`` of ``V`` is
``v_cn = Σ_t s_cnt a_ntᵀ`` (an ``O × I`` matrix). Two ways to get the Gram
matrix ``⟨v_cn, v_dm⟩``:

* **dense**: form ``V`` (``C·N·T·O·I`` multiply-adds, one batched matmul per
  column ``c``, no repeated input) and take ``VᵀV`` block by block, computing
  only blocks on and above the diagonal (``≈ (C·N)²·O·I / 2``);
* **pairwise**: per pair of samples ``(n, m)`` the input kernel
  ``K_nm = a_n a_mᵀ`` ``[T, T]``, then
  ``⟨v_cn, v_dm⟩ = Σ_{t,u,o} s_cnto K_nm,tu s_dmuo`` — costs
  ``N²·T²·I / 2 + N²·T²·C·O / 2 + N²·C²·T·O / 2``, cheap when the layer has
  few positions compared with its weight size (late convolutions).

Both process samples in chunks so that no intermediate exceeds
:data:`CHUNK_ELEMENTS` entries beyond the outputs, and both use the symmetry
of the Gram matrix. All outputs are sample-major: ``[N, C, N, C]`` Gram,
``[N, C, N']`` for ``Vᵀ g``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Largest intermediate (in entries) a chunk may create; 2**24 floats = 64 MiB.
CHUNK_ELEMENTS = 2**24


def _chunk(per_item: int, total: int) -> int:
    return max(1, min(total, CHUNK_ELEMENTS // max(per_item, 1)))


def sym_gram(rows: Tensor) -> Tensor:
    """``R Rᵀ`` computing only blocks on and above the diagonal.

    Args:
        rows: ``[M, D]``.

    Returns:
        ``[M, M]``, symmetric.
    """
    M = rows.shape[0]
    blocks = 8 if M >= 256 else 1
    step = -(-M // blocks)
    out = rows.new_empty(M, M)
    for i0 in range(0, M, step):
        i1 = min(M, i0 + step)
        out[i0:i1, i0:] = rows[i0:i1] @ rows[i0:].T
        out[i1:, i0:i1] = out[i0:i1, i1:].T
    return out


def outer_dense(s: Tensor, a: Tensor) -> Tensor:
    """Materialise ``V`` from its outer-product factors, BackPACK order.

    Args:
        s: ``[C, N, T, O]``.
        a: ``[N, T, I]``.

    Returns:
        ``[C, N, O·I]``.
    """
    C, N, _, O = s.shape  # noqa: E741
    out = s.new_empty(C, N, O, a.shape[-1])
    for c in range(C):
        torch.bmm(s[c].transpose(1, 2), a, out=out[c])
    return out.flatten(2)


def grads_dense(delta: Tensor, a: Tensor) -> Tensor:
    """Per-sample gradients ``Σ_t δ_nt a_ntᵀ`` as ``[N', O·I]``."""
    return torch.bmm(delta.transpose(1, 2), a).flatten(1)


def pairwise_gram(s: Tensor, a: Tensor, delta: Tensor | None = None):
    """Gram matrix (and optionally ``Vᵀ g``) through pairwise input kernels.

    Args:
        s: Backpropagated factor ``[C, N, T, O]``.
        a: Layer input ``[N, T, I]``, shared by the factor and the gradients.
        delta: Output gradients ``[N, T, O]`` of the same samples, or ``None``.

    Returns:
        ``(gram, vtg)``: ``[N, C, N, C]`` and ``[N, C, N]`` (``None`` without
        ``delta``), sample-major.
    """
    C, N, T, O = s.shape  # noqa: E741
    s_rows = s.permute(1, 0, 2, 3).reshape(N, C, T * O)
    s_pos = s.permute(1, 2, 0, 3)  # [N, T, C, O]
    gram = s.new_empty(N, C, N, C)
    vtg = None if delta is None else s.new_empty(N, C, N)
    step = _chunk(N * T * max(C * O, T), N)
    for m0 in range(0, N, step):
        m1 = min(N, m0 + step)
        M, lo = m1 - m0, (0 if delta is not None else m0)
        kernel = a[lo:].reshape(-1, a.shape[-1]) @ a[m0:m1].reshape(M * T, -1).T
        # [M, (N - lo)·T, T]: kernel[m, (n, t), u] = <a_nt, a_mu>
        kernel = kernel.reshape(-1, M, T).transpose(0, 1)
        if delta is not None:
            q = torch.bmm(kernel, delta[m0:m1]).reshape(M, N, T * O)
            vtg[:, :, m0:m1] = torch.bmm(s_rows, q.permute(1, 2, 0))
        k_low = kernel[:, (m0 - lo) * T :]
        p = torch.bmm(k_low, s_pos[m0:m1].reshape(M, T, C * O))
        p = p.reshape(M, N - m0, T, C, O).permute(1, 2, 4, 0, 3)
        block = torch.bmm(s_rows[m0:], p.reshape(N - m0, T * O, M * C))
        gram[m0:, :, m0:m1] = block.reshape(N - m0, C, M, C)
        gram[m0:m1, :, m1:] = gram[m1:, :, m0:m1].permute(2, 3, 0, 1)
    return gram, vtg


def pairwise_times_grads(s: Tensor, a: Tensor, delta: Tensor, a_grad: Tensor):
    """``Vᵀ g_m`` through pairwise kernels, inputs of the gradients ``a_grad``.

    Args:
        s: ``[C, N, T, O]``.
        a: ``[N, T, I]``.
        delta: ``[N', T, O]``.
        a_grad: ``[N', T, I]``.

    Returns:
        ``[N, C, N']``, sample-major.
    """
    C, N, T, O = s.shape  # noqa: E741
    N_g = delta.shape[0]
    s_rows = s.permute(1, 0, 2, 3).reshape(N, C, T * O)
    out = s.new_empty(N, C, N_g)
    step = _chunk(N * T * max(O, T), N_g)
    for m0 in range(0, N_g, step):
        m1 = min(N_g, m0 + step)
        M = m1 - m0
        kernel = a.reshape(N * T, -1) @ a_grad[m0:m1].reshape(M * T, -1).T
        kernel = kernel.reshape(N * T, M, T).transpose(0, 1)
        q = torch.bmm(kernel, delta[m0:m1]).reshape(M, N, T * O)
        out[:, :, m0:m1] = torch.bmm(s_rows, q.permute(1, 2, 0))
    return out
