"""The one training loop of the network studies; callbacks record what a study needs.

Mini-batches are a pure function of ``(seed, step)`` (:func:`batch_indices`): epoch
``e`` uses a permutation of the training set drawn from a generator seeded with
``(seed, e)``, and the incomplete last batch is dropped. Every optimiser therefore
sees the same batches for a seed, and a resumed run the batches it would have seen.

:func:`train_loop` is, in outline::

    while True:
        done = state.diverged or until(state)
        for callback in callbacks:             # evaluate, checkpoint, ...
            callback.at_step(state, done)
        if done or state.diverged:
            break
        loss, output = step_fn(...)            # timed: forward, backward, step()
        state.step += 1; state.elapsed += seconds; state.last = StepRecord(...)
        for callback in callbacks:             # log, divergence, progress, ...
            callback.after_step(state)

The clock covers ``step_fn`` and reading its loss; callbacks run outside it. The
studies' callbacks are in :mod:`experiments.common.callbacks` (evaluation curves,
progress bar) and :mod:`experiments.common.resumable` (per-step log, checkpoints).

Example:
    >>> from experiments.problems import get_problem, make_seeded
    >>> problem = get_problem("digits_logreg")
    >>> data = problem.load_data()
    >>> model, loss_fn = make_seeded(problem, data.input_shape, 10, extended=False)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> state = LoopState(model, loss_fn, optimizer, data)
    >>> state = train_loop(state, batch_size=32, seed=0, until=lambda s: s.step >= 5)
    >>> state.step, state.last.step
    (5, 4)

"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from experiments.problems.data import ImageData

#: torch's warning about the full backward hooks ``backpack.extend`` registers.
HOOK_WARNING = "Full backward hook is firing"

#: ``(model, loss_fn, optimizer, inputs, labels) -> (loss, outputs)`` of one step;
#: ``outputs`` may be ``None`` (the step's accuracy is then NaN).
StepFn = Callable[
    [nn.Module, nn.Module, torch.optim.Optimizer, Tensor, Tensor],
    tuple["Tensor | float", "Tensor | None"],
]


@dataclass(frozen=True)
class StepRecord:
    """What one step did.

    Attributes:
        step: Index of the step (of its mini-batch), counted from ``0``.
        loss: Mini-batch loss before the update (NaN if the step was refused).
        accuracy: Mini-batch accuracy before the update (NaN without outputs).
        seconds: Timed seconds of the step.

    """

    step: int
    loss: float
    accuracy: float
    seconds: float


@dataclass
class LoopState:
    """What the loop and its callbacks share.

    Attributes:
        model: The model (trained in place).
        loss_fn: Its loss.
        optimizer: The optimiser of ``model``'s parameters.
        data: The data; batches come from ``data.train_x``, ``data.train_y``.
        step: Steps taken so far (the next step's index). Default: ``0``.
        elapsed: Timed seconds so far (may start with set-up time). Default: ``0``.
        diverged: Set by a callback to end the loop after the current callbacks.
        last: The latest step's record (``None`` before the first step).

    """

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    data: ImageData
    step: int = 0
    elapsed: float = 0.0
    diverged: bool = False
    last: StepRecord | None = None


class Callback:
    """Base of the loop's callbacks: override what you need, the rest does nothing."""

    def at_step(self, state: LoopState, done: bool) -> None:
        """Called before step ``state.step`` is taken, and once more at the end.

        Args:
            state: The loop's state.
            done: ``True`` on the last call (no step follows).

        """

    def after_step(self, state: LoopState) -> None:
        """Called after every step; ``state.last`` describes it."""


def batch_indices(num_samples: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Return the indices of the training mini-batch used at ``step`` (see module doc).

    Raises:
        ValueError: If the data set is smaller than one batch.

    """
    steps_per_epoch = num_samples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_samples} samples.")
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    perm = torch.randperm(num_samples, generator=generator)
    return perm[position * batch_size : (position + 1) * batch_size]


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    labels: Tensor,
) -> tuple[Tensor, Tensor]:
    """One step on ``(inputs, labels)``; return the mini-batch loss and outputs.

    Optimisers exposing BackPACK ``extensions`` and a ``hook`` (``DampedNewton``,
    ``LanczosDampedNewton``) get their backward pass inside ``with backpack(...)``.
    Both returned tensors are from before the update.
    """
    optimizer.zero_grad()
    with _backward_context(optimizer), warnings.catch_warnings():
        # BackPACK's hooks on an extended model, not the user's concern
        warnings.filterwarnings("ignore", HOOK_WARNING, UserWarning)
        output = model(inputs)
        loss = loss_fn(output, labels)
        loss.backward()
    optimizer.step()
    return loss, output


def _backward_context(optimizer: torch.optim.Optimizer):
    if hasattr(optimizer, "extensions") and hasattr(optimizer, "hook"):
        from backpack import backpack

        return backpack(*optimizer.extensions, extension_hook=optimizer.hook)
    return contextlib.nullcontext()


def train_loop(
    state: LoopState,
    *,
    batch_size: int,
    seed: int,
    until: Callable[[LoopState], bool],
    callbacks: Sequence[Callback] = (),
    step_fn: StepFn = train_step,
    refused: tuple[type[Exception], ...] = (),
) -> LoopState:
    """Train from ``state`` until ``until(state)`` holds or a callback flags divergence.

    Args:
        state: Model, loss, optimiser, data and where to start (``state.step``,
            ``state.elapsed``); updated in place.
        batch_size: Mini-batch size.
        seed: Seed of the batch order (see :func:`batch_indices`).
        until: ``state -> bool``, asked before every step: ``True`` ends training.
        callbacks: Called in this order at every step (see the module doc).
        step_fn: One optimisation step. Default: :func:`train_step`.
        refused: Exceptions of ``step_fn`` that mean "non-finite numbers, no
            update": the step is recorded with a NaN loss and training goes on (a
            callback usually flags divergence). Default: none, every error
            propagates.

    Returns:
        ``state`` after the last callbacks.

    """
    while True:
        done = state.diverged or until(state)
        for callback in callbacks:
            callback.at_step(state, done)
        if done or state.diverged:
            return state
        idx = batch_indices(len(state.data.train_y), batch_size, state.step, seed)
        inputs, labels = state.data.train_x[idx], state.data.train_y[idx]
        start = time.perf_counter()
        try:
            loss, output = step_fn(
                state.model, state.loss_fn, state.optimizer, inputs, labels
            )
            loss = loss.item() if isinstance(loss, Tensor) else float(loss)
        except refused:
            loss, output = math.nan, None
        seconds = time.perf_counter() - start
        accuracy = math.nan if output is None else _accuracy(output, labels)
        state.last = StepRecord(state.step, loss, accuracy, seconds)
        state.step += 1
        state.elapsed += seconds
        for callback in callbacks:
            callback.after_step(state)


def _accuracy(output: Tensor, labels: Tensor) -> float:
    return (output.argmax(1) == labels).float().mean().item()
