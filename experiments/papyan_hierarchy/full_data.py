"""Full-data Hessian, GGN and residual spectra by Lanczos, with top-C deflation.

Following Papyan (2019, *The full spectrum of deepnet Hessians at scale*), the
Hessian ``H`` splits into the GGN ``G`` and a residual ``H - G``; on the whole
training set these are only reachable matrix-free. For each operator: the top ``C``
eigenvalues (thick-restart Lanczos) and the spectral density of the rank-``C``
deflated operator (stochastic Lanczos quadrature), from :mod:`vivitlib.hessianfree`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn


def data_batches(inputs: Tensor, labels: Tensor, batch_size: int) -> list:
    """Split a data set into a fixed list of ``(X, y)`` batches (no shuffling)."""
    return [
        (inputs[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


def full_data_table(
    model: nn.Module,
    loss_fn: nn.Module,
    batches: list,
    num_classes: int,
    *,
    num_iters: int = 60,
    num_probes: int = 5,
    kernel_var: float | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Compute top-C eigenvalues and deflated densities of ``H``, ``G``, ``H - G``.

    Args:
        model: Plain (not BackPACK-extended) model in eval mode.
        loss_fn: Mean-reduced loss.
        batches: The data as ``(X, y)`` batches.
        num_classes: ``C``, the number of top eigenvalues deflated.
        num_iters: Lanczos steps per probe. Default: ``60``.
        num_probes: Random probes. Default: ``5``.
        kernel_var: Gaussian kernel variance on the ``[-1, 1]``-normalised
            spectrum. Default: ``(2 / num_iters)²``, a kernel as wide as the mean
            spacing of one probe's Ritz nodes: a narrower kernel shows every node
            as a separate spike (regular "comb" ripples).
        seed: Seed of probes and starting vectors. Default: ``0``.

    Returns:
        Rows with columns ``operator`` (``hessian``, ``ggn``, ``residual``),
        ``kind`` (``top`` eigenvalue or ``density`` grid point), ``x``, ``y``.

    """
    from vivitlib import hessianfree as hf

    hessian = hf.HessianOperator(model, loss_fn, batches)
    ggn = hf.GGNOperator(model, loss_fn, batches)
    operators = {
        "hessian": hessian,
        "ggn": ggn,
        "residual": hessian.to_scipy() - ggn.to_scipy(),
    }
    if kernel_var is None:
        kernel_var = (2.0 / num_iters) ** 2
    frames = []
    for name, op in operators.items():
        top = hf.topk_eigh(
            op,
            num_classes,
            which="largest",
            generator=torch.Generator().manual_seed(seed),
        )
        density = hf.spectral_density(
            op,
            num_iters,
            num_probes,
            deflate=num_classes,
            kernel_var=kernel_var,
            generator=torch.Generator().manual_seed(seed),
        )
        evals = _numpy(top.evals)
        frames.append(
            pd.DataFrame({"operator": name, "kind": "top", "x": evals, "y": np.nan})
        )
        frames.append(
            pd.DataFrame(
                {
                    "operator": name,
                    "kind": "density",
                    "x": _numpy(density.grid),
                    "y": _numpy(density.density),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _numpy(tensor) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float64)
    return tensor.detach().to(torch.float64).cpu().numpy()
