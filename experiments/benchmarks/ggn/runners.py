"""One curvature pass per (library, configuration), as a zero-argument callable.

Each runner does the forward and backward pass and extracts the configuration's
result (eigenvalues, lifted eigenvectors, directional derivatives, Newton step),
so that its wall time and memory cover the whole job. The peer is
``vivit-for-pytorch`` 1.0.0, whose removed ``Tensor.symeig`` calls are mapped to
``torch.linalg`` at run time by :func:`patch_symeig` (site-packages untouched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from backpack import backpack

import vivitlib
from experiments.benchmarks.ggn.problems import Problem

#: Configurations, in table order. ``gradient`` is the plain backward baseline.
CONFIGS = (
    "gradient",
    "eigvals",
    "eigvals_mc1",
    "eigvals_sub8",
    "eigvals_layerwise",
    "eigpairs_top10",
    "dirderiv_top10",
    "newton",
)
LIBRARIES = ("vivitlib", "vivit", "floor", "floor_full")
TOP_K = 10
DAMPING = 1e-3
#: Directions with ``λ ≤ RTOL · λ_max`` are left out (vivit's criterion).
RTOL = 1e-4


def vivit_available() -> bool:
    """Whether ``vivit-for-pytorch`` can be imported."""
    try:
        import vivit  # noqa: F401
    except ImportError:
        return False
    return True


def patch_symeig() -> None:
    """Make ``Tensor.symeig`` (removed from torch, raises) work for vivit 1.0.0.

    Maps it to ``torch.linalg.eigh`` / ``eigvalsh`` (ascending, like ``symeig``).
    """
    if getattr(torch.Tensor.symeig, "_vivit_shim", False):
        return

    def symeig(self, eigenvectors: bool = False, upper: bool = True):
        uplo = "U" if upper else "L"
        if eigenvectors:
            return torch.linalg.eigh(self, UPLO=uplo)
        return torch.linalg.eigvalsh(self, UPLO=uplo), self.new_empty(0)

    symeig._vivit_shim = True
    torch.Tensor.symeig = symeig


def _backward(problem: Problem, extensions, hook) -> None:
    problem.zero_grad()
    with backpack(*extensions, extension_hook=hook):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()


def _subsample(problem: Problem, config: str) -> list[int] | None:
    if config != "eigvals_sub8":
        return None
    return list(range(max(1, problem.X.shape[0] // 8)))


def _vivitlib_runner(
    problem: Problem, config: str, max_memory: int | str | None = None
) -> Callable[[], Any]:
    compute = {
        "eigpairs_top10": ("eigenvalues", "eigenvectors"),
        "dirderiv_top10": ("eigenvalues", "directional_derivatives"),
        "newton": ("newton_step",),
    }.get(config, ("eigenvalues",))
    groups = problem.params
    if config == "eigvals_layerwise":
        groups = problem.layer_groups()

    def run() -> Any:
        ggn = vivitlib.LowRankGGN(
            groups,
            mc_samples=1 if config == "eigvals_mc1" else 0,
            subsampling=_subsample(problem, config),
            compute=compute,
            max_memory=max_memory,
        )
        _backward(problem, ggn.extensions, ggn.hook)
        block = ggn.blocks[0]
        if config == "eigpairs_top10":
            return block.evals[:TOP_K], block.evecs(TOP_K)
        if config == "dirderiv_top10":
            return block.gammas[:, :TOP_K], block.lambdas[:, :TOP_K]
        if config == "newton":
            return block.newton_step(DAMPING)
        return [b.evals for b in ggn.blocks]

    return run


def _top_k(evals: torch.Tensor) -> list[int]:
    n = evals.numel()
    return list(range(max(0, n - TOP_K), n))


def _nontrivial(evals: torch.Tensor) -> list[int]:
    return torch.nonzero(evals > RTOL * evals.max()).flatten().tolist()


def _vivit_runner(problem: Problem, config: str) -> Callable[[], Any]:
    from vivit.linalg.eigh import EighComputation
    from vivit.linalg.eigvalsh import EigvalshComputation
    from vivit.optim import (
        DirectionalDampedNewtonComputation,
        DirectionalDerivativesComputation,
    )

    patch_symeig()
    subsampling = _subsample(problem, config)
    mc = 1 if config == "eigvals_mc1" else 0
    groups = [{"params": problem.params}]
    if config == "eigvals_layerwise":
        groups = problem.layer_groups()

    def run() -> Any:
        if config == "eigpairs_top10":
            comp = EighComputation(warn_small_eigvals=0.0)
            group = {"params": problem.params, "criterion": _top_k}
        elif config == "dirderiv_top10":
            comp = DirectionalDerivativesComputation(warn_small_eigvals=0.0)
            group = {"params": problem.params, "criterion": _top_k}
        elif config == "newton":
            comp = DirectionalDampedNewtonComputation(warn_small_eigvals=0.0)
            group = {
                "params": problem.params,
                "criterion": _nontrivial,
                "damping": lambda evals, *_: torch.full_like(evals, DAMPING),
            }
        else:
            comp = EigvalshComputation(subsampling=subsampling, mc_samples=mc)
            all_groups = [dict(g) for g in groups]
            ext = comp.get_extension()
            _backward(problem, [ext], comp.get_extension_hook(all_groups))
            return [comp.get_result(g) for g in all_groups]
        exts = comp.get_extensions() if hasattr(comp, "get_extensions") else None
        exts = exts if exts is not None else [comp.get_extension()]
        _backward(problem, exts, comp.get_extension_hook([group]))
        return comp.get_result(group)

    return run


def _gradient_runner(problem: Problem) -> Callable[[], Any]:
    def run() -> Any:
        problem.zero_grad()
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
        return [p.grad for p in problem.params]

    return run


def make_runner(
    library: str,
    config: str,
    problem: Problem,
    max_memory: int | str | None = None,
) -> Callable[[], Any]:
    """A callable doing one complete pass of ``config`` with ``library``.

    Args:
        library: ``'vivitlib'``, ``'vivit'``, ``'floor'`` (the eigenvalue pass's
            floor, :mod:`.floor`, whatever ``config``), ``'floor_full'`` (the
            full-compute floor: eigenpairs and Newton step) or ``'torch'``
            (plain gradient only).
        config: One of :data:`CONFIGS`.
        problem: The problem to run on.
        max_memory: vivitlib's ``LowRankGGN(max_memory=...)`` (only for
            ``library='vivitlib'``; ``None``: the default).

    Returns:
        Zero-argument callable returning the configuration's result.

    Raises:
        ValueError: For an unknown library or configuration.
    """
    if config not in CONFIGS:
        raise ValueError(f"Unknown config {config!r}; choose one of {CONFIGS}.")
    if max_memory is not None and library != "vivitlib":
        raise ValueError(f"max_memory is a vivitlib option, not one of {library!r}.")
    if config == "gradient":
        return _gradient_runner(problem)
    if library in ("floor", "floor_full"):
        from experiments.benchmarks.ggn.floor import floor_runner

        return floor_runner(problem, full=library == "floor_full")
    if library == "vivitlib":
        return _vivitlib_runner(problem, config, max_memory)
    if library == "vivit":
        return _vivit_runner(problem, config)
    raise ValueError(f"Unknown library {library!r}; choose one of {LIBRARIES}.")
