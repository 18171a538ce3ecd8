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

    ``G = Jᵀ ∇²_f L J`` and ``∇L`` of the loss as reduced; per-sample
    ``G_n = Jₙᵀ ∇²_{fₙ} ℓ_n Jₙ`` and ``g_n = Jₙᵀ ∇_{fₙ} ℓ_n`` of the per-sample
    loss ``ℓ_n`` (the loss with ``reduction='sum'`` on sample n), for the
    samples the loss counts (rows of ignored samples are dropped).
    ``batch_scale · mean_n G_n = G`` and ``batch_scale · mean_n g_n = ∇L``.
    """

    ggn: Tensor  # [D, D]
    per_sample_ggn: Tensor  # [N_counted, D, D]
    per_sample_grads: Tensor  # [N_counted, D]
    grad: Tensor  # [D]
    batch_scale: float = 1.0


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
    sum_loss = copy.copy(loss_fn)
    sum_loss.reduction = "sum"
    batch_hess = hessian(lambda o: loss_fn(o, y))(out).reshape(N * jac.shape[1], -1)
    batch_grad = jacrev(lambda o: loss_fn(o, y))(out).reshape(-1)
    flat_jac = jac.reshape(-1, theta.numel())
    ggn = flat_jac.T @ batch_hess @ flat_jac
    grad = flat_jac.T @ batch_grad
    sample_hess = hessian(lambda o: sum_loss(o, y))(out)
    sample_hess = sample_hess.reshape(N, -1, N, out[0].numel())
    sample_grad = jacrev(lambda o: sum_loss(o, y))(out).reshape(N, -1)
    counted = _counted_samples(loss_fn, y, N)
    per_ggn = torch.stack(
        [jac[n].T @ sample_hess[n, :, n, :] @ jac[n] for n in counted]
    )
    per_grad = torch.einsum("ncd,nc->nd", jac, sample_grad)[counted]
    # Z = L_sum / L_mean (independent of the library's bookkeeping)
    total = float(sum_loss(out, y))
    normaliser = total / float(loss_fn(out, y)) if loss_fn.reduction == "mean" else 1
    return DenseCurvature(ggn, per_ggn, per_grad, grad, len(counted) / normaliser)


def _counted_samples(loss_fn, y: Tensor, N: int) -> list[int]:
    """Samples with at least one target the loss does not ignore."""
    ignore = getattr(loss_fn, "ignore_index", None)
    if ignore is None or y.is_floating_point():
        return list(range(N))
    return [n for n in range(N) if bool(y[n].ne(ignore).any())]


def eigh_desc(matrix: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(matrix)
    return evals.flip(0), evecs.flip(1)


def per_sample_hessians(model, loss_fn, X: Tensor, y: Tensor) -> Tensor:
    """Hessians ``[N, D, D]`` of the per-sample losses (``reduction='sum'`` form)."""
    model, loss_fn = plain_copy(model), plain_copy(loss_fn)
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [named[n].numel() for n in names]
    theta = flat_params(list(named.values()))
    N = X.shape[0]
    loss_fn.reduction = "sum"

    def loss_n(vec, n):
        params = {k: c.reshape(named[k].shape) for k, c in zip(names, vec.split(sizes))}
        out = functional_call(model, params, (X[n : n + 1],))
        return loss_fn(out, y[n : n + 1])

    return torch.stack([hessian(loss_n)(theta, n) for n in range(N)])
