"""Gram matrix of the GGN factor."""

from __future__ import annotations

from torch import Tensor


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
