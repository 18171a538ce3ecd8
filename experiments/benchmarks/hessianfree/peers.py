"""Optional peers (PyHessian, curvlinops) behind a common, product-counting face."""

from __future__ import annotations

import importlib.metadata as md
import sys

import numpy as np
import torch


def version(dist: str) -> str | None:
    """Installed version of a distribution, or ``None``."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


class Counter:
    """Counts matrix-vector products."""

    def __init__(self) -> None:
        self.n = 0


def pyhessian_handle(model, loss_fn, X, y, dataloader=None):
    """Return ``(hessian_obj, counter)`` with HVPs counted, or ``None``."""
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        return None
    ph = sys.modules["pyhessian.hessian"]  # the package shadows it by the class
    counter = Counter()
    if not hasattr(ph, "_vivit_original_hvp"):
        ph._vivit_original_hvp = ph.hessian_vector_product
        original_dl = ph.hessian.dataloader_hv_product

        def counted_dl(self, v):
            ph._vivit_counter.n += 1
            return original_dl(self, v)

        def counted(gradsH, params, v):
            ph._vivit_counter.n += 1
            return ph._vivit_original_hvp(gradsH, params, v)

        ph.hessian_vector_product = counted
        ph.hessian.dataloader_hv_product = counted_dl
    ph._vivit_counter = counter
    if dataloader is None:
        obj = ph.hessian(model, loss_fn, data=(X, y), cuda=False)
    else:
        obj = ph.hessian(model, loss_fn, dataloader=dataloader, cuda=False)
    model.zero_grad(set_to_none=True)
    return obj, counter


def curvlinops_operator(model, loss_fn, data, kind: str = "hessian"):
    """Return ``(operator, counter)`` for curvlinops' Hessian/GGN, or ``None``."""
    try:
        import curvlinops
    except ImportError:
        return None
    cls = {
        "hessian": curvlinops.HessianLinearOperator,
        "ggn": curvlinops.GGNLinearOperator,
    }[kind]
    op = cls(model, loss_fn, list(model.parameters()), data)
    counter = Counter()
    original = op._matmat

    def counted(M):
        counter.n += M[0].shape[-1]
        return original(M)

    op._matmat = counted
    return op, counter


def curvlinops_slq(op, num_iters: int, num_probes: int, seed: int):
    """Nodes and weights of curvlinops' ``fast_lanczos`` over probes (+ range).

    Returns ``(nodes, weights, range_products)``: the boundary estimate that
    ``lanczos_approximate_spectrum`` runs (scipy eigsh, tol 1e-2) is counted.
    """
    from curvlinops.papyan2020traces.spectrum import (
        approximate_boundaries,
        fast_lanczos,
    )

    torch.manual_seed(seed)
    np.random.seed(seed)
    approximate_boundaries(op, tol=1e-2)
    nodes, weights = [], []
    for _ in range(num_probes):
        evals, evecs = fast_lanczos(op, num_iters)
        nodes.append(evals.double())
        weights.append(evecs[0].double() ** 2 / num_probes)
    return torch.cat(nodes), torch.cat(weights)
