"""Thin helpers around :class:`vivitlib.LowRankGGN` used by several studies."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

#: Evaluation precisions of the curvature passes.
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
#: What the noise studies' passes compute by default.
NOISE_QUANTITIES = ("eigenvalues", "directional_derivatives")


def in_precision(
    model: nn.Module, inputs: Tensor, precision: str
) -> tuple[nn.Module, Tensor]:
    """Cast ``model`` (in place) and floating-point ``inputs`` to ``precision``.

    Args:
        model: The model (a freshly loaded checkpoint; it is changed in place).
        inputs: Its inputs.
        precision: ``'float32'`` or ``'float64'``.

    Returns:
        ``(model, inputs)`` in the requested precision.

    Raises:
        ValueError: If ``precision`` is not one of :data:`PRECISIONS`.

    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}."
        )
    dtype = PRECISIONS[precision]
    return model.to(dtype), inputs.to(dtype)


def low_rank_ggn(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    params: Iterable | None = None,
    mc_samples: int = 0,
    subsampling: Sequence[int] | None = None,
    compute: Sequence[str] = NOISE_QUANTITIES,
):
    """One BackPACK backward pass on ``(inputs, labels)`` with a ``LowRankGGN``.

    Args:
        model: BackPACK-extended model (batch norm in eval mode).
        loss_fn: BackPACK-extended loss.
        inputs: Mini-batch inputs ``[N, ...]``.
        labels: Mini-batch labels ``[N]``.
        params: Parameters or parameter groups; default: all of ``model``'s.
        mc_samples: ``0`` = exact loss-Hessian factor, ``m > 0`` = MC. Default: ``0``.
        subsampling: Sample indices used for curvature. Default: all.
        compute: Quantities this pass must deliver. Default: eigenvalues and
            directional derivatives.

    Returns:
        The ``LowRankGGN`` after the pass (``.blocks`` filled, ``.grad`` set).

    """
    from backpack import backpack

    import vivitlib

    ggn = vivitlib.LowRankGGN(
        model.parameters() if params is None else params,
        mc_samples=mc_samples,
        subsampling=None if subsampling is None else list(subsampling),
        compute=tuple(compute),
    )
    model.zero_grad()
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(model(inputs), labels).backward()
    return ggn


def direction_table(block) -> pd.DataFrame:
    """Per-direction statistics of one GGN block (needs directional derivatives).

    Columns: ``k``, ``eigenvalue`` (λ_k), ``gamma`` (γ_k), ``abs_gamma``,
    ``lambda_mean`` (mean of λ_nk), ``gamma_var`` and ``lambda_var`` (over samples),
    ``gamma_snr``, ``lambda_snr``, ``overlap`` (γ_k²/‖g‖²), plus the block-wide
    ``num_nontrivial`` (K) and ``flat_overlap`` (1 - Σ_k overlap).
    """
    evals = _numpy(block.evals)
    gammas, lambdas = _numpy(block.gammas), _numpy(block.lambdas)
    overlaps = _numpy(block.gradient_overlaps)
    frame = pd.DataFrame(
        {
            "k": np.arange(len(evals)),
            "eigenvalue": evals,
            "gamma": _numpy(block.gamma_means),
            "lambda_mean": _numpy(block.lambda_means),
            "gamma_var": gammas.var(axis=0, ddof=0),
            "lambda_var": lambdas.var(axis=0, ddof=0),
            "gamma_snr": _numpy(block.gamma_snr),
            "lambda_snr": _numpy(block.lambda_snr),
            "overlap": overlaps,
        }
    )
    frame.insert(3, "abs_gamma", frame["gamma"].abs())
    frame["num_nontrivial"] = len(evals)
    frame["flat_overlap"] = 1.0 - overlaps.sum()
    return frame


def eigenvalues(block) -> np.ndarray:
    """Return the block's nontrivial eigenvalues as float64 numpy, descending."""
    return _numpy(block.evals)


def flatten_direction(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate one direction given per parameter into a flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).cpu().numpy()
