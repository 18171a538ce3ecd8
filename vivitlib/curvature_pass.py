"""The life cycle of one curvature pass (see :class:`CurvaturePass`)."""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor
from torch.nn import Module

from vivitlib.distributed import FactorExchange
from vivitlib.extensions.losses import LossWeighting


class CurvaturePass:
    """One curvature pass of a collector: batch facts, accumulators, ``.grad`` backup.

    Life cycle, each step visible in its flags:

    1. **started** -- BackPACK reached the loss module (the collector validated
       the batch and built the pass, backing up every grouped ``.grad``);
    2. **backward done** (``backward_done``) -- autograd ran the callback the
       collector queued at the start (:meth:`end_backward`); from then on a
       further gradient accumulation into a grouped parameter means a later
       ``backward()`` ran without the collector: the pass is ``stale``;
    3. **finished** (``finished``) -- the results were read and checked for
       completeness.

    A failure at any step restores ``.grad`` (:meth:`restore_grads`) and drops
    the pass.
    """

    def __init__(
        self,
        loss_module: Module,
        groups: list[dict[str, Any]],
        accumulators,
        weighting: LossWeighting,
        exchange: FactorExchange | None = None,
    ):
        self.loss_output = loss_module.output
        self.exchange = exchange
        self.batch_size = loss_module.input0.shape[0]
        self.weighting = weighting
        self.params = [p for group in groups for p in group["params"]]
        self.grad_backup = {
            id(p): (p, None if p.grad is None else p.grad.detach().clone())
            for p in self.params
        }
        self.accumulators = accumulators
        # per-sample basis of a deflated cross-entropy factor's columns
        # (set by the collector; ``None``: BackPACK's columns)
        self.column_basis: Tensor | None = None
        self.finished = False
        self.backward_done = False
        self.stale = False
        self._handles: list = []

    def restore_grads(self) -> None:
        """Put every ``.grad`` back as it was before the pass."""
        for p, grad in self.grad_backup.values():
            p.grad = grad

    def end_backward(self) -> None:
        """Mark the backward as finished; watch for later accumulations."""
        self.backward_done = True
        ref = weakref.ref(self)

        def on_accumulate(_: Tensor) -> None:
            owner = ref()
            if owner is not None:
                owner.stale = True
                owner.release()

        self._handles = [
            p.register_post_accumulate_grad_hook(on_accumulate) for p in self.params
        ]

    def release(self) -> None:
        """Remove the watch hooks from the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
