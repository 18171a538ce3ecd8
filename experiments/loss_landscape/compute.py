"""Loss on 2-D planes through the weights: top GGN eigenvectors vs random directions.

The top plane is spanned by the GGN's two leading eigenvectors ``e_1, e_2`` on a
batch (unit norm, from vivitlib's lifted Gram eigenvectors); the random plane by two
orthonormalised Gaussian directions. The loss ``L(θ + α d_1 + β d_2)`` is evaluated
on a grid for the training subset and the test set; the ``β = 0`` row is the 1-D
slice. Along ``e_k`` the batch's quadratic model predicts
``L(θ) + γ_k α + ½ λ_k α²``.

Columns of the table (``loss_landscape.csv``): ``plane`` (``top`` or ``random``),
``alpha`` and ``beta`` (coordinates along ``d_1`` and ``d_2``, parameter-space
units), ``split`` (``train`` subset or ``test``), ``loss``; for the top plane also
``lambda_1``, ``lambda_2`` (the two leading GGN eigenvalues on the batch) and
``gamma_1``, ``gamma_2`` (the batch gradient along them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from experiments.common.curvature import flatten_direction, low_rank_ggn


def top_plane(model, loss_fn, inputs, labels) -> tuple[Tensor, dict[str, float]]:
    """Return the two leading GGN eigenvectors ``[2, D]`` and their λ_k, γ_k."""
    ggn = low_rank_ggn(
        model,
        loss_fn,
        inputs,
        labels,
        compute=("eigenvalues", "eigenvectors", "directional_derivatives"),
    )
    block = ggn.blocks[0]
    evecs = block.evecs(k=2)
    plane = torch.stack([flatten_direction([e[k] for e in evecs]) for k in range(2)])
    info = {
        f"{name}_{k + 1}": float(values[k])
        for k in range(2)
        for name, values in (("lambda", block.evals), ("gamma", block.gamma_means))
    }
    return plane.detach(), info


def random_plane(dim: int, seed: int) -> Tensor:
    """Return two orthonormal Gaussian directions ``[2, D]``."""
    gaussian = torch.randn(
        dim, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    q, _ = torch.linalg.qr(gaussian)
    return q.T.to(torch.float32)


@torch.no_grad()
def loss_grid(
    model: nn.Module,
    loss_fn: nn.Module,
    plane: Tensor,
    coords: np.ndarray,
    splits: dict[str, tuple[Tensor, Tensor]],
) -> pd.DataFrame:
    """Evaluate the loss on ``θ + α d_1 + β d_2`` for ``α, β`` in ``coords``.

    The model's parameters are restored afterwards.
    """
    params = list(model.parameters())
    base = parameters_to_vector(params).detach().clone()
    rows = []
    try:
        for alpha in coords:
            for beta in coords:
                vector_to_parameters(base + alpha * plane[0] + beta * plane[1], params)
                for split, (inputs, labels) in splits.items():
                    loss = loss_fn(model(inputs), labels).item()
                    rows.append(
                        {"alpha": alpha, "beta": beta, "split": split, "loss": loss}
                    )
    finally:
        vector_to_parameters(base, params)
    return pd.DataFrame(rows)


def landscape_table(
    model, loss_fn, batch, splits, radius: float, num_points: int, seed: int
) -> pd.DataFrame:
    """Compute the loss grids of the top and the random plane.

    Args:
        model: BackPACK-extended model (eval mode).
        loss_fn: BackPACK-extended loss.
        batch: ``(inputs, labels)`` on which the GGN eigenvectors are computed.
        splits: ``{"train": (X, y), "test": (X, y)}`` evaluated on the grid.
        radius: Grid half-width in parameter-space units (directions have norm 1).
        num_points: Points per axis (odd, so that 0 is on the grid).
        seed: Seed of the random plane.

    Returns:
        Columns ``plane``, ``alpha``, ``beta``, ``split``, ``loss`` and, for the
        top plane, ``lambda_1``, ``lambda_2``, ``gamma_1``, ``gamma_2``.

    """
    coords = np.linspace(-radius, radius, num_points | 1)
    top, info = top_plane(model, loss_fn, *batch)
    frames = [
        loss_grid(model, loss_fn, top, coords, splits).assign(plane="top", **info)
    ]
    rand = random_plane(top.shape[1], seed)
    frames.append(
        loss_grid(model, loss_fn, rand, coords, splits).assign(plane="random")
    )
    return pd.concat(frames, ignore_index=True)
