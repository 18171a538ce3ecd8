"""How a loss module weights and normalises its samples, and an exact CE rule.

Every supported loss has the form ``L = (1/Z) Σ_n ℓ_n`` (``'mean'``) or
``L = Σ_n ℓ_n`` (``'sum'``, ``Z = 1``), where the per-sample loss ``ℓ_n`` is
what the same loss with ``reduction='sum'`` gives on sample ``n`` alone (the
sum of its unreduced elements). For cross-entropy the loss Hessian with respect
to the logits of position ``(n, t)`` is ``h_nt (diag p - p pᵀ)``, with a weight
``h_nt`` that is ``0`` for an ``ignore_index`` target, the class weight of the
target (mixed with the mean class weight under label smoothing) or the total
mass of a probability target. BackPACK's own rule assumes ``h = 1`` and
``Z = N·T``; :class:`CrossEntropySqrtGGN` rescales its factor to the loss's
actual weights, so that ``V Vᵀ`` is exactly the GGN of what the loss computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.extensions.secondorder.sqrt_ggn.losses import SqrtGGNBaseLossModule
from torch import Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, Module, MSELoss


@dataclass(frozen=True)
class LossWeighting:
    """Sample weights and normalisation of one evaluated loss.

    Attributes:
        position_weights: ``h_nt`` per sample and position, ``[N, *T]``
            (cross-entropy), or ``None`` when every element counts once.
        normaliser: ``Z`` with ``L = (1/Z) Σ_n ℓ_n`` (``1`` for ``'sum'``).
        counted: ``[N]`` bool, samples the loss counts (not entirely ignored).
    """

    position_weights: Tensor | None
    normaliser: float
    counted: Tensor


def loss_weighting(module: Module) -> LossWeighting:
    """Weights and normaliser of a BackPACK-extended loss after its forward pass.

    Args:
        module: The loss module (holds ``input0`` = model output and ``input1`` =
            target after BackPACK's forward hook).

    Returns:
        Its :class:`LossWeighting`.

    Raises:
        NotImplementedError: For a loss or loss option the library cannot
            represent exactly.
    """
    output = module.input0
    batch_size = output.shape[0]
    if isinstance(module, CrossEntropyLoss):
        weights = _cross_entropy_weights(module, output, module.input1)
        if _has_hard_targets(module.input1):
            valid = module.input1.ne(module.ignore_index)
            counted = valid.reshape(batch_size, -1).any(1)
            if module.weight is not None:
                total = module.weight.to(output.dtype)[module.input1[valid]].sum()
            else:
                total = valid.sum().to(output.dtype)
        else:
            counted = torch.ones(batch_size, dtype=torch.bool, device=output.device)
            total = torch.tensor(output.numel() // output.shape[1], dtype=output.dtype)
        normaliser = float(total) if module.reduction == "mean" else 1.0
        return LossWeighting(weights, normaliser, counted)
    if isinstance(module, (MSELoss, BCEWithLogitsLoss)):
        target = module.input1
        if tuple(target.shape) != tuple(output.shape):
            raise ValueError(
                f"{type(module).__name__}: the target has shape "
                f"{tuple(target.shape)} but the model output {tuple(output.shape)}; "
                "broadcasting mixes samples (every output is compared with every "
                "target), so there is no per-sample loss. Reshape the target to "
                "the output's shape (e.g. y.view_as(output))."
            )
        normaliser = float(output.numel()) if module.reduction == "mean" else 1.0
        counted = torch.ones(batch_size, dtype=torch.bool, device=output.device)
        return LossWeighting(None, normaliser, counted)
    raise NotImplementedError(
        f"{type(module).__name__} is not supported: use CrossEntropyLoss, MSELoss "
        "or BCEWithLogitsLoss as the last module."
    )


def _has_hard_targets(target: Tensor) -> bool:
    return not target.is_floating_point()


def _cross_entropy_weights(module: CrossEntropyLoss, output: Tensor, target: Tensor):
    """``h_nt``: the scale of position ``(n, t)``'s softmax Hessian, ``[N, *T]``."""
    num_classes = output.shape[1]
    smoothing = float(module.label_smoothing)
    class_weights = (
        torch.ones(num_classes, dtype=output.dtype, device=output.device)
        if module.weight is None
        else module.weight.detach().to(output.dtype)
    )
    if _has_hard_targets(target):
        valid = target.ne(module.ignore_index)
        safe = torch.where(valid, target, torch.zeros_like(target))
        weights = (1 - smoothing) * class_weights[safe]
        weights = weights + smoothing * class_weights.mean()
        return weights * valid.to(output.dtype)
    # probability targets [N, C, *T], smoothed towards the uniform distribution
    probs = (1 - smoothing) * target.to(output.dtype) + smoothing / num_classes
    shape = [1, num_classes] + [1] * (output.ndim - 2)
    return (probs * class_weights.reshape(shape)).sum(1)


class _ExactCrossEntropyDerivatives(CrossEntropyLossDerivatives):
    """BackPACK's cross-entropy derivatives, reweighted to the loss's options."""

    def _check_2nd_order_parameters(self, module: CrossEntropyLoss) -> None:
        """Every ``weight``/``ignore_index``/``label_smoothing`` is handled here."""

    def _sqrt_hessian(self, module, g_inp, g_out, subsampling=None) -> Tensor:
        factor = super()._sqrt_hessian(module, g_inp, g_out, subsampling=subsampling)
        return _reweight(factor, module, subsampling)

    def _sqrt_hessian_sampled(
        self, module, g_inp, g_out, mc_samples=1, subsampling=None
    ) -> Tensor:
        factor = super()._sqrt_hessian_sampled(
            module, g_inp, g_out, mc_samples=mc_samples, subsampling=subsampling
        )
        return _reweight(factor, module, subsampling)


def _reweight(factor: Tensor, module: CrossEntropyLoss, subsampling) -> Tensor:
    """Scale BackPACK's ``[V, n, C, *T]`` factor by ``sqrt(h_nt · Z_backpack / Z)``."""
    weighting = loss_weighting(module)
    weights = weighting.position_weights
    if subsampling is not None:
        weights = weights[subsampling]
    if module.reduction == "mean":
        backpack_normaliser = module.input0.numel() // module.input0.shape[1]
        weights = weights * (backpack_normaliser / weighting.normaliser)
    if bool((weights == 1).all()):
        return factor
    scale = weights.sqrt().to(factor.dtype).unsqueeze(1).unsqueeze(0)
    return factor * scale


def cross_entropy_column_basis(module: Module, subsampling=None) -> Tensor | None:
    r"""Per-sample basis that gives the cross-entropy factor ``C - 1`` columns.

    The cross-entropy Hessian w.r.t. the logits of sample ``n`` is
    ``h_n (diag(p_n) - p_n p_nᵀ)``; BackPACK's ``C``-column square root ``S_n``
    maps the unit vector ``u_n = √p_n`` to zero, so ``S_n B_n`` with an
    orthonormal basis ``B_n`` ``[C, C-1]`` of ``u_n^⊥`` is a square root with
    ``C - 1`` columns: ``S_n B_n B_nᵀ S_nᵀ = S_n S_nᵀ``. ``B_n`` is the
    Householder reflection mapping ``u_n`` to ``-e_k`` without column ``k``,
    ``k`` the most probable class: ``‖u_n + e_k‖² ≥ 2`` (no cancellation), and
    for a confident prediction the reflection is close to the identity on the
    other classes, so the new columns do not mix columns of very different
    size (which would cost a float32 factor accuracy).

    Args:
        module: The loss module after its forward pass.
        subsampling: Samples whose columns are kept (``None``: all).

    Returns:
        ``B`` ``[n, C, C-1]`` in the logits' dtype, or ``None`` where the
        factor keeps its ``C`` columns: other losses, ``C < 2`` and outputs
        with positions (``[N, C, *T]``, whose columns are shared by the
        positions).
    """
    if not isinstance(module, CrossEntropyLoss) or module.input0.ndim != 2:
        return None
    logits = module.input0.detach()
    num_classes = logits.shape[1]
    if num_classes < 2:
        return None
    if subsampling is not None:
        logits = logits[list(subsampling)]
    w = torch.softmax(logits, dim=1).sqrt()
    top = w.argmax(dim=1, keepdim=True)  # [n, 1]
    w.scatter_add_(1, top, torch.ones_like(top, dtype=w.dtype))
    w /= w.norm(dim=1, keepdim=True)
    reflection = -2 * w[:, :, None] * w[:, None, :]
    reflection.diagonal(dim1=1, dim2=2).add_(1)
    others = torch.arange(num_classes - 1, device=w.device).expand(len(w), -1)
    others = others + (others >= top).to(others.dtype)  # every column but top
    return reflection.gather(2, others[:, None, :].expand(-1, num_classes, -1))


class CrossEntropySqrtGGN(SqrtGGNBaseLossModule):
    """Square-root GGN rule for ``CrossEntropyLoss`` with any of its options.

    With an exact factor and an extension that asks for it (``ext.deflate``),
    the factor has ``C - 1`` columns per sample (:func:`cross_entropy_column_basis`).
    """

    def __init__(self):
        """Use the reweighted cross-entropy derivatives."""
        super().__init__(_ExactCrossEntropyDerivatives())

    def backpropagate(self, ext, module, grad_inp, grad_out, backproped):  # noqa: D102
        factor = super().backpropagate(ext, module, grad_inp, grad_out, backproped)
        if not getattr(ext, "deflate", False) or ext.get_num_mc_samples() != 0:
            return factor
        basis = cross_entropy_column_basis(module, ext.get_subsampling())
        if basis is None:
            return factor
        # [C, n, C_out] -> [C - 1, n, C_out]: columns combined by each sample's basis
        return torch.einsum("cno,ncj->jno", factor, basis.to(factor.dtype))


#: Loss class -> square-root-GGN rule replacing BackPACK's.
LOSS_SQRT = {CrossEntropyLoss: CrossEntropySqrtGGN}

__all__ = [
    "LOSS_SQRT",
    "CrossEntropySqrtGGN",
    "LossWeighting",
    "loss_weighting",
    "cross_entropy_column_basis",
]
