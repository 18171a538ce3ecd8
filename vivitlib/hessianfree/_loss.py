"""How the loss weights batches, and checks of what model and loss return.

With ``reduction='mean'`` the full-data loss is ``L = Σ_b (W_b / W) L_b``,
where ``W_b`` is the denominator of the batch mean ``L_b``: the number of
samples for most losses (the number of output elements of ``MSELoss`` only
differs by a constant factor), but the summed class weights of the targets
that are not ``ignore_index`` for ``CrossEntropyLoss`` and ``NLLLoss`` with
class indices. Weighting batches by ``W_b / W`` keeps the operators exact for
batches of unequal size, class weights and ignored targets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def _class_indices(loss_fn: Any, y: Any) -> bool:
    """Whether ``loss_fn`` is a class loss fed with integer class indices."""
    return (
        isinstance(loss_fn, _CLASS_LOSSES)
        and isinstance(y, Tensor)
        and not y.is_floating_point()
    )


def mean_denominator(loss_fn: Any, y: Any, batch_size: int) -> float:
    """Return ``W_b``, what the ``'mean'`` reduction of ``loss_fn`` divides by.

    Args:
        loss_fn: The loss.
        y: The batch's targets.
        batch_size: Number of samples of the batch.

    Returns:
        The summed class weights of the kept targets for ``CrossEntropyLoss``
        / ``NLLLoss`` with class indices, else ``batch_size``.

    """
    if not _class_indices(loss_fn, y):
        return float(batch_size)
    keep = y != loss_fn.ignore_index
    if loss_fn.weight is None:
        return float(keep.sum())
    weight = loss_fn.weight.to(y.device)
    return float((weight[torch.where(keep, y, 0)] * keep).sum())


def check_no_weighting(loss_fn: Any, y: Any, operator: str) -> None:
    """Raise if ``loss_fn`` weights samples unequally (class weights, ignored targets).

    Raises:
        NotImplementedError: For ``CrossEntropyLoss``/``NLLLoss`` with ``weight``
            or targets equal to ``ignore_index``.

    """
    if not _class_indices(loss_fn, y):
        return
    if loss_fn.weight is not None or bool((y == loss_fn.ignore_index).any()):
        raise NotImplementedError(
            f"{operator} does not support class weights or targets equal to "
            f"ignore_index={loss_fn.ignore_index}: the per-sample gradients of a "
            "weighted mean are not defined by the loss. Use HessianOperator or "
            "GGNOperator (which follow the weighting exactly), or remove the "
            "ignored samples and the weight= argument."
        )


_PIECEWISE_LINEAR = (
    nn.NLLLoss,
    nn.L1Loss,
    nn.HingeEmbeddingLoss,
    nn.MarginRankingLoss,
    nn.MultiLabelMarginLoss,
    nn.TripletMarginLoss,
)


def check_ggn_loss(loss_fn: Any) -> None:
    """Raise if the GGN of ``loss_fn`` vanishes (loss piecewise linear in the output).

    Raises:
        NotImplementedError: For ``NLLLoss``, ``L1Loss``, hinge and margin
            losses (and ``MultiMarginLoss`` with ``p=1``).

    """
    linear = isinstance(loss_fn, _PIECEWISE_LINEAR) or (
        isinstance(loss_fn, nn.MultiMarginLoss) and loss_fn.p == 1
    )
    if linear:
        raise NotImplementedError(
            f"GGNOperator with {type(loss_fn).__name__}: the loss is piecewise "
            "linear in the model output, so its Hessian there, and the GGN, is "
            "zero. For NLLLoss move the log_softmax into the loss "
            "(CrossEntropyLoss on logits); otherwise use HessianOperator."
        )


def checked_output(output: Any, operator: str) -> Tensor:
    """Return the model output if it is one floating tensor, else raise.

    Raises:
        TypeError: If the model returns something other than a floating tensor.

    """
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise TypeError(
            f"{operator} needs the model to return one floating-point tensor (the "
            f"loss's input), got {type(output).__name__}. Wrap the model so that "
            "forward returns the tensor passed to loss_fn."
        )
    return output


def checked_loss(loss: Any) -> Tensor:
    """Return ``loss`` if it is a real scalar tensor, else raise.

    Raises:
        TypeError: If ``loss_fn`` did not return a tensor.
        ValueError: If the loss is not a scalar.

    """
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar: "
            "use a loss with reduction='mean' or 'sum'."
        )
    return loss.reshape(())
