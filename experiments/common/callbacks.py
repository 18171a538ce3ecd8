"""Callbacks of :func:`~experiments.common.training.train_loop`: curves and progress.

:class:`Curve` evaluates the model on the full training and test sets at the steps
its ``when`` picks and keeps one row per evaluation; it also flags divergence.
:class:`Progress` shows a tqdm bar. The per-step log and the checkpoints of
resumable runs are :class:`experiments.common.resumable.Checkpoints`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from experiments.common.training import Callback, LoopState
from experiments.problems.data import ImageData

#: A run counts as diverged (and stops) once a mini-batch loss exceeds this multiple
#: of the first evaluated training loss or is not finite.
DIVERGED = 100.0


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, data: ImageData) -> dict:
    """Loss and accuracy on the full training and test sets.

    Returns:
        ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``.

    """
    result = {}
    for split in ("train", "test"):
        inputs, labels = data.split(split)
        output = model(inputs)
        result[f"{split}_loss"] = loss_fn(output, labels).item()
        result[f"{split}_accuracy"] = (output.argmax(1) == labels).float().mean().item()
    return result


def every(period: int) -> Callable[[LoopState, bool], bool]:
    """A ``when`` of :class:`Curve`: every ``period`` steps and at the end."""
    return lambda state, done: done or state.step % period == 0


class Curve(Callback):
    """Evaluation rows along training, and the divergence flag.

    Each row has the columns ``step``, ``time_s`` (timed seconds so far),
    ``step_time_s`` (mean seconds per step since the previous row), ``batch_loss``
    (mean mini-batch loss since then), those of :func:`evaluate`, those of every
    ``extras`` and ``diverged``.

    Args:
        when: ``(state, done) -> bool``: evaluate before this step (e.g.
            :func:`every`); called once at every step, in order.
        extras: ``state -> dict`` of further columns of a row, called in order.
        diverge_above: After each step, flag divergence if the mini-batch loss is
            not finite or exceeds this multiple of the first row's
            ``train_loss``; ``None``: never. Default: :data:`DIVERGED`.

    """

    def __init__(
        self,
        when: Callable[[LoopState, bool], bool],
        extras: Sequence[Callable[[LoopState], dict]] = (),
        diverge_above: float | None = DIVERGED,
    ) -> None:
        self.when = when
        self.extras = tuple(extras)
        self.diverge_above = diverge_above
        self.rows: list[dict] = []
        self._losses: list[float] = []
        self._seconds = 0.0

    def at_step(self, state: LoopState, done: bool) -> None:
        """Evaluate if ``when`` says so."""
        if not self.when(state, done):
            return
        losses = self._losses
        row = {"step": state.step, "time_s": state.elapsed}
        row["step_time_s"] = self._seconds / len(losses) if losses else math.nan
        row["batch_loss"] = sum(losses) / len(losses) if losses else math.nan
        row.update(evaluate(state.model, state.loss_fn, state.data))
        for extra in self.extras:
            row.update(extra(state))
        row["diverged"] = state.diverged
        self.rows.append(row)
        self._seconds, self._losses = 0.0, []

    def after_step(self, state: LoopState) -> None:
        """Accumulate the step's time and loss; check for divergence."""
        loss = state.last.loss
        self._seconds += state.last.seconds
        self._losses.append(loss)
        if self.diverge_above is not None:
            first = self.rows[0]["train_loss"] if self.rows else math.inf
            limit = self.diverge_above * first
            state.diverged = state.diverged or not math.isfinite(loss) or loss > limit

    def frame(self) -> pd.DataFrame:
        """The rows as a table."""
        return pd.DataFrame(self.rows)


class Progress(Callback):
    """A tqdm progress bar over ``total`` steps, starting at ``initial``."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train")

    def at_step(self, state: LoopState, done: bool) -> None:
        """Close the bar at the end."""
        if done:
            self.bar.close()

    def after_step(self, state: LoopState) -> None:
        """Advance the bar."""
        self.bar.update()
