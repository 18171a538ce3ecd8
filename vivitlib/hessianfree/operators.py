"""Hessian, GGN and empirical Fisher operators over a data set (matrix-free).

All three share the data loop of :class:`~vivitlib.hessianfree._base.CurvatureOperator`;
each batch's product is computed with ``torch.autograd`` (no BackPACK):

- Hessian: double backward through the batch gradient graph.
- GGN ``Jᵀ (∇²_f ℓ) J``: ``Jv`` by the double-backward trick, the output
  Hessian by backward through ``∇_f ℓ``, then the vector-Jacobian product.
- Empirical Fisher ``Σ_n g_n g_nᵀ`` (per-sample gradients ``g_n``, scaled by
  ``1/N`` for ``reduction='mean'``): per-sample directional derivatives
  ``g_nᵀ v`` by the double-backward trick, then one backward.

With a single batch the graphs are built once and reused for every product
(``cache_graph``), which makes a product a single backward-sized pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vivitlib.hessianfree._base import CurvatureOperator
from vivitlib.hessianfree._loss import (
    check_ggn_loss,
    check_no_weighting,
    checked_loss,
    checked_output,
)


def _grad(
    outputs: Tensor,
    inputs: list[Tensor],
    grad_outputs: Tensor,
    retain: bool,
    create: bool = False,
) -> list[Tensor]:
    """Vector-Jacobian product; inputs the outputs do not depend on get zeros."""
    if not outputs.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(
        outputs,
        inputs,
        grad_outputs,
        retain_graph=retain or create,
        create_graph=create,
        allow_unused=True,
    )
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


class HessianOperator(CurvatureOperator):
    r"""Hessian ``∇²_θ L`` of the loss over the whole data set.

    .. math:: H v = \sum_b w_b \nabla_\theta (\nabla_\theta L_b^\top v)

    with batch weights ``w_b = N_b / N`` (``'mean'``) or 1 (``'sum'``).

    Example:
        >>> import torch
        >>> from vivitlib import hessianfree as hf
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3).double(), torch.randint(0, 2, (8,))
        >>> H = hf.HessianOperator(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> H.shape
        (8, 8)
        >>> (H @ torch.ones(8)).shape
        torch.Size([8])

    """

    def _build(self, X: Tensor, y: Tensor) -> Any:
        loss = checked_loss(self._loss_fn(self._model(X), y))
        grads = _grad(loss, self.params, None, retain=False, create=True)
        pairs = [(g, i) for i, g in enumerate(grads) if g.requires_grad]
        return [g for g, _ in pairs], [i for _, i in pairs]

    def _apply(self, state: Any, vec: list[Tensor], retain: bool) -> list[Tensor]:
        grads, idx = state
        if not grads:
            return [torch.zeros_like(p) for p in self.params]
        hv = torch.autograd.grad(
            grads,
            self.params,
            [vec[i] for i in idx],
            retain_graph=retain,
            allow_unused=True,
        )
        return [
            torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)
        ]


class GGNOperator(CurvatureOperator):
    """Generalized Gauss-Newton ``Σ_b w_b J_bᵀ (∇²_f L_b) J_b`` over the data set.

    ``J_b`` is the Jacobian of the model outputs of batch ``b`` w.r.t. the
    parameters and ``∇²_f L_b`` the Hessian of the batch loss w.r.t. those
    outputs; weights as for :class:`HessianOperator`. Losses that are
    piecewise linear in the output (``NLLLoss``, ``L1Loss``, hinge and margin
    losses), whose GGN is zero, are refused.
    """

    def _check_loss_fn(self, loss_fn: Any) -> None:
        check_ggn_loss(loss_fn)

    def _build(self, X: Tensor, y: Tensor) -> Any:
        out = checked_output(self._model(X), type(self).__name__)
        loss = checked_loss(self._loss_fn(out, y))
        if not loss.requires_grad:
            return out, out, out, [], []
        (grad_out,) = torch.autograd.grad(loss, out, create_graph=True)
        dummy = torch.zeros_like(out, requires_grad=True)
        jac_t = _grad(out, self.params, dummy, retain=True, create=True)
        idx = [i for i, j in enumerate(jac_t) if j.requires_grad]
        return out, grad_out, dummy, [jac_t[i] for i in idx], idx

    def _apply(self, state: Any, vec: list[Tensor], retain: bool) -> list[Tensor]:
        out, grad_out, dummy, jac_t, idx = state
        if not jac_t:
            return [torch.zeros_like(p) for p in self.params]
        (jv,) = torch.autograd.grad(
            jac_t, dummy, [vec[i] for i in idx], retain_graph=True, allow_unused=True
        )
        if jv is None:
            return [torch.zeros_like(p) for p in self.params]
        (hjv,) = (
            torch.autograd.grad(grad_out, out, jv, retain_graph=True)
            if grad_out.requires_grad
            else (torch.zeros_like(out),)
        )
        return _grad(out, self.params, hjv, retain=retain)


class EmpiricalFisherOperator(CurvatureOperator):
    r"""Empirical Fisher (uncentred gradient covariance) over the data set.

    .. math:: F = c \sum_n g_n g_n^\top, \quad g_n = \nabla_\theta \ell_n,

    with ``c = 1/N`` for ``reduction='mean'`` and ``c = 1`` for ``'sum'``.
    The per-sample loss ``ℓ_n`` is ``loss_fn`` on the batch of sample ``n``
    alone, so that ``L = c Σ_n ℓ_n``.
    """

    def _batch_weight(self, y: Any, batch_size: int) -> float:
        return 1.0 / self.num_data if self._reduction == "mean" else 1.0

    def _check_batch(self, index: int, batch: Any) -> int:
        size = super()._check_batch(index, batch)
        check_no_weighting(self._loss_fn, batch[1], type(self).__name__)
        return size

    def _per_sample_losses(self, out: Tensor, y: Tensor) -> Tensor:
        def single(o: Tensor, t: Tensor) -> Tensor:
            return checked_loss(self._loss_fn(o.unsqueeze(0), t.unsqueeze(0)))

        return torch.func.vmap(single)(out, y)

    def _build(self, X: Tensor, y: Tensor) -> Any:
        out = checked_output(self._model(X), type(self).__name__)
        losses = self._per_sample_losses(out, y)
        dummy = torch.zeros_like(losses, requires_grad=True)
        grads_t = _grad(losses, self.params, dummy, retain=True, create=True)
        return losses, dummy, grads_t

    def _apply(self, state: Any, vec: list[Tensor], retain: bool) -> list[Tensor]:
        losses, dummy, grads_t = state
        pairs = [(g, v) for g, v in zip(grads_t, vec) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in self.params]
        (gv,) = torch.autograd.grad(
            [g for g, _ in pairs], dummy, [v for _, v in pairs], retain_graph=True
        )
        return _grad(losses, self.params, gv, retain=retain)
