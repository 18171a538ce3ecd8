"""Gram matrix of the GGN factor."""

from __future__ import annotations

from torch import Tensor

#: Entries of the temporaries of the chunked functions below (per chunk).
CHUNK_ELEMENTS = 2**20
#: Entries converted to float64 at a time when adding float32 products.
_CAST_ELEMENTS = 2**17
#: Rows per strip in :func:`mirror_upper_` (transposed copies of narrow strips
#: stay in cache: 11 ms at ``M = 2560`` against 57 ms with 1024 rows).
_MIRROR_ROWS = 64


def gram_matrix(V: Tensor) -> Tensor:
    """Return the Gram matrix ``Vᵀ V`` of a GGN factor.

    The GGN is ``G = V Vᵀ`` with ``V`` of shape ``[D, M]`` (``M = N·C`` columns,
    sample-major: column ``n·C + c`` belongs to sample ``n`` and output ``c``).
    The nonzero eigenvalues of ``G`` are those of ``Vᵀ V``.

    Args:
        V: Factor, shape ``[D, M]``.

    Returns:
        Gram matrix, shape ``[M, M]``.

    Example:
        >>> import torch
        >>> V = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
        >>> gram_matrix(V)
        tensor([[1., 0.],
                [0., 4.]])
    """
    if V.ndim != 2:
        raise ValueError(f"V must have shape [D, M], got {tuple(V.shape)}.")
    return V.T @ V


def add_kronecker_gram_upper(total: Tensor, s: Tensor, weights: Tensor) -> Tensor:
    r"""Add a linear weight's Gram block to the upper triangle of ``total``.

    For a weight whose factor columns are ``s_cn a_nᵀ``,

    .. math::
        \text{total}[c, n, d, m] \mathrel{+}= ⟨s_{cn}, s_{dm}⟩ · W_{nm}

    with ``W = ⟨a_n, a_m⟩`` (plus ``1`` to include the same layer's bias, whose
    factor is ``s``). Only the entries on and above the diagonal of the
    flattened ``[C·N, C·N]`` matrix are all added (a few below it get partial
    sums): complete the matrix with :func:`mirror_upper_`. The products run
    in ``s``'s dtype a few rows at a time, so no ``[C·N, C·N]`` temporary
    exists.

    Args:
        total: ``[C, N, C, N]``, contiguous, changed in place.
        s: ``[C, N, O]``.
        weights: ``[N, N]``, symmetric.

    Returns:
        ``total``.
    """
    C, N = s.shape[:2]
    rows, flat = s.reshape(C * N, -1), total.view(C * N, C * N)
    step = max(1, min(N, CHUNK_ELEMENTS // max(C * N, 1)))
    for c in range(C):
        for n0 in range(0, N, step):
            n1, i0 = min(N, n0 + step), c * N + n0
            block = rows[i0 : c * N + n1] @ rows[i0:].T  # [r, (c, n0) ... (C, N)]
            # a mixed-dtype add makes a float64 copy of its input: a few rows
            # at a time
            sub = max(1, _CAST_ELEMENTS // block.shape[1])
            for r0 in range(0, n1 - n0, sub):
                m0, m1 = n0 + r0, min(n1, n0 + r0 + sub)
                part = block[r0 : r0 + sub]
                own, rest = part[:, : N - n0], part[:, N - n0 :]
                target = flat[c * N + m0 : c * N + m1, i0 : (c + 1) * N]
                target.addcmul_(own, weights[m0:m1, n0:])
                later = total[c, m0:m1, c + 1 :]  # classes after c, [r, C-c-1, N]
                later.addcmul_(rest.view(later.shape), weights[m0:m1, None, :])
    return total


def mirror_upper_(matrix: Tensor) -> Tensor:
    """Copy the strict upper triangle of ``matrix`` onto its strict lower one.

    In place, a few rows at a time (no ``[M, M]`` temporary); the diagonal is
    left as it is.

    Args:
        matrix: ``[M, M]``.

    Returns:
        ``matrix``, now symmetric.
    """
    M = matrix.shape[0]
    step = _MIRROR_ROWS
    for i0 in range(0, M, step):
        i1 = min(i0 + step, M)
        matrix[i1:, i0:i1] = matrix[i0:i1, i1:].T
        block = matrix[i0:i1, i0:i1]
        block.copy_(block.triu() + block.triu(1).T)
    return matrix
