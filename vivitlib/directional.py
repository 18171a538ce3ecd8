r"""Per-sample directional derivatives along any given directions.

Given ``K`` directions ``d_k`` in parameter space (Lanczos eigenvectors, random
directions, GGN eigenvectors of another batch, ...), one backward pass gives

.. math::
    γ_{nk} = d_k^⊤ g_n, \qquad λ_{nk} = d_k^⊤ G_n d_k = N ‖V_n^⊤ d_k‖²

with the same conventions as :class:`vivitlib.LowRankGGN`: ``g_n`` and ``G_n``
belong to the per-sample loss ``ℓ_n`` whatever the reduction, and
``batch_scale`` times their means are ``d_kᵀ g`` and ``d_kᵀ G d_k`` of the batch
loss as reduced. The per-sample Hessian curvatures
``d_kᵀ H_n d_k`` are available for small batches by double backward through
:func:`per_sample_hessian_curvatures`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import Module

from vivitlib.collector import BackpackCollector
from vivitlib.factors import as_factor, as_grads


@dataclass
class _ProjectionAccumulator:
    params: list[Tensor]
    directions: dict[int, Tensor]
    factor_proj: Tensor | None = None  # [C, N, K]
    grad_proj: Tensor | None = None  # [N', K]
    visited: set[int] = field(default_factory=set)

    def add(self, param: Tensor, factor, grads) -> None:
        d = self.directions[id(param)]
        vtd = as_factor(factor).project(d).to(torch.float64)
        gtd = as_grads(grads).project(d).to(torch.float64)
        self.factor_proj = vtd if self.factor_proj is None else self.factor_proj + vtd
        self.grad_proj = gtd if self.grad_proj is None else self.grad_proj + gtd
        self.visited.add(id(param))

    def missing(self) -> list[Tensor]:
        return [p for p in self.params if id(p) not in self.visited]


class DirectionalDerivatives(BackpackCollector):
    """Per-sample first- and second-order derivatives along given directions.

    Use like :class:`vivitlib.LowRankGGN`::

        dd = DirectionalDerivatives(params, directions)
        with backpack(*dd.extensions, extension_hook=dd.hook):
            loss_fn(model(X), y).backward()
        dd.gammas, dd.lambdas

    Args:
        params: The parameters (one group).
        directions: One tensor per parameter, ``[K, *param.shape]``; the ``k``-th
            slices together form direction ``d_k`` (need not be normalised).
        mc_samples: ``0`` exact GGN, ``m > 0`` Monte-Carlo factor.
        subsampling: Samples for the curvatures ``λ_nk`` (default all).
        grad_subsampling: Samples for the gradients ``γ_nk`` (default all).
        generator: Source of the Monte-Carlo draws (default torch's global one).
        max_memory: Working-memory budget of the pass (bytes or a string such
            as ``"256MiB"``; see :class:`~vivitlib.LowRankGGN`). Default
            ``None``: no budget.

    Raises:
        ValueError: If the directions do not match the parameters.
    """

    # Projections are linear in V: a parameter shared by two modules (tied
    # weights) gets the sum of both modules' projections, which is exact.
    _sums_shared_params = True

    def __init__(
        self,
        params: Sequence[Tensor],
        directions: Sequence[Tensor],
        *,
        mc_samples: int = 0,
        subsampling: Sequence[int] | Tensor | None = None,
        grad_subsampling: Sequence[int] | Tensor | None = None,
        generator: torch.Generator | None = None,
        max_memory: int | str | None = None,
    ):
        super().__init__(
            params,
            mc_samples=mc_samples,
            subsampling=subsampling,
            grad_subsampling=grad_subsampling,
            generator=generator,
            max_memory=max_memory,
        )
        if len(self.param_groups) != 1:
            raise ValueError("DirectionalDerivatives takes one group of parameters.")
        self._directions = _check_directions(self.param_groups[0]["params"], directions)
        self._result: tuple[Tensor, Tensor] | None = None

    @property
    def num_directions(self) -> int:
        """``K``."""
        return next(iter(self._directions.values())).shape[0]

    @property
    def gammas(self) -> Tensor:
        """``γ_nk = d_kᵀ g_n``, ``[N_g, K]`` (float64)."""
        return self._results()[0]

    @property
    def lambdas(self) -> Tensor:
        """``λ_nk = d_kᵀ G_n d_k``, ``[N_c, K]`` (float64)."""
        return self._results()[1]

    @property
    def batch_scale(self) -> float:
        """Batch quantity = ``batch_scale`` × mean of the per-sample ones.

        ``1`` for a ``'mean'`` loss without weights, ``N`` for ``'sum'``; see
        :attr:`vivitlib.block.GGNBlock.batch_scale`.
        """
        return self._results()[2]

    def _results(self) -> tuple[Tensor, Tensor, float]:
        if self._result is None:
            scaling = self._finish_pass()
            acc = self._pass.accumulators[0]
            gammas = acc.grad_proj * scaling.grads
            lambdas = acc.factor_proj.pow(2).sum(0) * scaling.grads
            if scaling.grad_keep is not None:
                gammas = gammas[scaling.grad_keep]
            if scaling.curv_keep is not None:
                lambdas = lambdas[scaling.curv_keep]
            self._result = (gammas, lambdas, scaling.batch_scale)
        return self._result

    def _on_reset(self) -> None:
        self._result = None

    def _new_accumulators(self) -> list[_ProjectionAccumulator]:
        params = self.param_groups[0]["params"]
        return [_ProjectionAccumulator(params, self._directions)]


def _check_directions(
    params: list[Tensor], directions: Sequence[Tensor]
) -> dict[int, Tensor]:
    directions = _check_direction_values(params, directions)
    if len(directions) != len(params):
        raise ValueError(
            f"Got {len(directions)} direction tensors for {len(params)} parameters; "
            "pass one [K, *param.shape] tensor per parameter."
        )
    counts = {d.shape[0] for d in directions}
    if len(counts) != 1:
        raise ValueError(
            f"The direction tensors disagree on K (their first axis): "
            f"{sorted(counts)}; each must be [K, *param.shape] with the same K."
        )
    for p, d in zip(params, directions):
        if tuple(d.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"Direction of shape {tuple(d.shape)} does not fit a parameter of "
                f"shape {tuple(p.shape)}; expected [K, {', '.join(map(str, p.shape))}]."
            )
    return {id(p): d.detach() for p, d in zip(params, directions)}


def _check_direction_values(params: list[Tensor], directions) -> list[Tensor]:
    """Type, K axis, dtype/device and finiteness of user-given directions."""
    if isinstance(directions, Tensor):
        raise TypeError(
            "directions must be a sequence with one [K, *param.shape] tensor per "
            "parameter, got a single tensor; wrap it in a list."
        )
    directions = list(directions)
    for p, d in zip(params, directions):
        if not isinstance(d, Tensor):
            raise TypeError(f"directions must hold tensors, got {type(d).__name__}.")
        if d.ndim == p.ndim and tuple(d.shape) == tuple(p.shape):
            raise ValueError(
                f"A direction has the parameter's shape {tuple(p.shape)} but no "
                "leading K axis; pass d.unsqueeze(0) for a single direction."
            )
        if not d.is_floating_point():
            raise TypeError(f"directions must be floating point, got {d.dtype}.")
        if d.device != p.device:
            raise ValueError(
                f"A direction is on {d.device} but its parameter on {p.device}; "
                "move the directions to the parameters' device."
            )
        if not bool(torch.isfinite(d).all()):
            raise ValueError(
                "The directions contain NaN or Inf; pass finite directions."
            )
    if directions and directions[0].ndim > 0 and directions[0].shape[0] == 0:
        raise ValueError("directions hold K = 0 directions; pass at least one.")
    return directions


def per_sample_hessian_curvatures(
    model: Module,
    loss_fn: Module,
    X: Tensor,
    y: Tensor,
    directions: Sequence[Tensor],
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """``d_kᵀ H_n d_k`` per sample by double backward (for small batches).

    Per-sample Hessians follow the library's convention: they belong to the
    per-sample loss ``ℓ_n`` (``loss_fn`` with ``reduction='sum'`` on sample
    ``n`` alone), whatever ``loss_fn``'s reduction. Costs ``N·K``
    Hessian-vector products; use for analysis on small ``N``.

    Args:
        model: The network (need not be extended).
        loss_fn: Loss with ``reduction`` ``'mean'`` or ``'sum'``.
        X: Inputs ``[N, ...]``.
        y: Targets ``[N, ...]``.
        directions: One ``[K, *param.shape]`` tensor per parameter.
        params: Parameters the directions refer to (default: all of ``model``'s
            trainable ones).

    Returns:
        ``[N, K]`` float64 curvatures.
    """
    params = (
        [p for p in model.parameters() if p.requires_grad]
        if params is None
        else list(params)
    )
    _check_directions(params, directions)
    N = X.shape[0]
    per_sample_loss = copy.copy(loss_fn)
    per_sample_loss.reduction = "sum"
    K = directions[0].shape[0]
    out = torch.empty(N, K, dtype=torch.float64)
    for n in range(N):
        loss = per_sample_loss(model(X[n : n + 1]), y[n : n + 1])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for k in range(K):
            dot = sum((g * d[k]).sum() for g, d in zip(grads, directions))
            hvp = torch.autograd.grad(dot, params, retain_graph=True)
            out[n, k] = sum((h * d[k]).sum() for h, d in zip(hvp, directions)).item()
    return out
