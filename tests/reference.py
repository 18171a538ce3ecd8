"""Independent dense float64 references built with torch.func (no BackPACK)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, hessian, jacrev


@dataclass
class DenseCurvature:
    """Dense GGN quantities of one batch, with the library's conventions.

    ``G = Jᵀ ∇²_f L J``; per-sample ``G_n = N Jₙᵀ ∇²_{fₙ} L Jₙ`` and
    ``g_n = N Jₙᵀ ∇_{fₙ} L`` so that their means are ``G`` and ``∇L``.
    """

    ggn: Tensor  # [D, D]
    per_sample_ggn: Tensor  # [N, D, D]
    per_sample_grads: Tensor  # [N, D]
    grad: Tensor  # [D]


def plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """Deep copy without BackPACK's (or any) hooks, so torch.func can trace it."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        sub._forward_hooks.clear()
        sub._backward_hooks.clear()
        sub._backward_pre_hooks.clear()
        sub._is_full_backward_hook = None
    return clone


def flat_params(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def dense_curvature(
    model, loss_fn, X: Tensor, y: Tensor, params=None
) -> DenseCurvature:
    """Dense GGN, per-sample GGNs and gradients w.r.t. ``params`` (default all)."""
    original = dict(model.named_parameters())
    if params is None:
        params = list(original.values())
    names = [n for n, p in original.items() if any(p is q for q in params)]
    names.sort(key=lambda n: [i for i, q in enumerate(params) if q is original[n]][0])
    model, loss_fn = plain_copy(model), plain_copy(loss_fn)
    named = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    sizes = [named[n].numel() for n in names]
    theta = flat_params([named[n] for n in names])

    def unflatten(vec):
        out = dict(fixed)
        for name, chunk in zip(names, vec.split(sizes)):
            out[name] = chunk.reshape(named[name].shape)
        return out

    def outputs(vec):
        return functional_call(model, unflatten(vec), (X,))

    out = outputs(theta).detach()
    N = out.shape[0]
    jac = jacrev(outputs)(theta).reshape(N, -1, theta.numel())  # [N, C, D]
    loss_of_out = lambda o: loss_fn(o, y)  # noqa: E731
    out_hess = hessian(loss_of_out)(out).reshape(N, -1, N, out[0].numel())
    out_grad = jacrev(loss_of_out)(out).reshape(N, -1)
    per_ggn = torch.stack(
        [N * jac[n].T @ out_hess[n, :, n, :] @ jac[n] for n in range(N)]
    )
    per_grad = N * torch.einsum("ncd,nc->nd", jac, out_grad)
    return DenseCurvature(per_ggn.mean(0), per_ggn, per_grad, per_grad.mean(0))


def eigh_desc(matrix: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(matrix)
    return evals.flip(0), evecs.flip(1)


def per_sample_hessians(model, loss_fn, X: Tensor, y: Tensor) -> Tensor:
    """Per-sample loss Hessians ``[N, D, D]`` whose mean is the batch loss Hessian."""
    model, loss_fn = plain_copy(model), plain_copy(loss_fn)
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [named[n].numel() for n in names]
    theta = flat_params(list(named.values()))
    N = X.shape[0]
    scale = N if loss_fn.reduction == "sum" else 1

    def loss_n(vec, n):
        params = {k: c.reshape(named[k].shape) for k, c in zip(names, vec.split(sizes))}
        out = functional_call(model, params, (X[n : n + 1],))
        return loss_fn(out, y[n : n + 1]) * scale

    return torch.stack([hessian(loss_n)(theta, n) for n in range(N)])
