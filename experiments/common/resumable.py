"""Checkpointed SGD/Adam runs of the curvature studies that resume exactly.

A run is :func:`~experiments.common.training.train_loop` with a
:class:`Checkpoints` callback: it keeps the per-step log and writes a checkpoint
(model, optimizer, torch RNG state, step, log; see
:mod:`experiments.common.checkpoints`) at the requested steps. Batches are a
function of ``(seed, step)``, so resuming from a checkpoint continues bit-for-bit
like an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn

from experiments.common.callbacks import Progress
from experiments.common.checkpoints import (
    checkpoint_path,
    restore,
    resume_point,
    save_checkpoint,
)
from experiments.common.optimizers import FIRST_ORDER, make_optimizer
from experiments.common.training import Callback, LoopState, train_loop
from experiments.problems.data import ImageData


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run.

    Attributes:
        optimizer: ``'sgd'`` (with momentum) or ``'adam'``.
        lr: Learning rate.
        batch_size: Training mini-batch size.
        num_steps: Number of optimisation steps.
        momentum: SGD momentum. Default: ``0.9``.
        seed: Seed of initialisation and batch order. Default: ``0``.

    """

    optimizer: str
    lr: float
    batch_size: int
    num_steps: int
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in FIRST_ORDER:
            raise ValueError(
                f"optimizer must be one of {FIRST_ORDER}, got {self.optimizer!r}."
            )
        if self.batch_size < 1 or self.num_steps < 0:
            raise ValueError("batch_size must be >= 1 and num_steps >= 0.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")


class Checkpoints(Callback):
    """The per-step log, and a checkpoint at each of ``stops``.

    Args:
        folder: Folder of the run's checkpoints.
        stops: Steps to checkpoint at, ascending, none before the start.
        config: The run's hyper-parameters (stored in each checkpoint).
        log: The log so far (from the checkpoint resumed). Default: empty.

    """

    def __init__(
        self,
        folder: Path,
        stops: Sequence[int],
        config: TrainConfig,
        log: Iterable[dict] = (),
    ) -> None:
        self.folder, self.config = Path(folder), config
        self.stops = list(stops)
        self.log = list(log)

    def at_step(self, state: LoopState, done: bool) -> None:
        """Write the checkpoint of this step if it is one of ``stops``."""
        if self.stops and state.step == self.stops[0]:
            self.stops.pop(0)
            path = checkpoint_path(self.folder, state.step)
            save_checkpoint(
                path, state.model, state.optimizer, state.step, self.log, self.config
            )

    def after_step(self, state: LoopState) -> None:
        """Append the step's ``step``, ``loss`` and ``accuracy`` to the log."""
        record = state.last
        self.log.append(
            {"step": record.step, "loss": record.loss, "accuracy": record.accuracy}
        )


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    data: ImageData,
    config: TrainConfig,
    checkpoint_dir: Path,
    save_steps: Iterable[int] = (),
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> pd.DataFrame:
    """Train ``model``, writing checkpoints at ``save_steps``.

    Training resumes from the latest usable checkpoint in ``checkpoint_dir`` (see
    :func:`~experiments.common.checkpoints.resume_point`): after an interruption,
    with more steps than before (continuing the shorter run), or from before a
    missing or damaged checkpoint of ``save_steps``. If every checkpoint is present,
    nothing is trained or written. Studies evaluate the checkpoints afterwards (see
    :func:`experiments.common.study.evaluate_checkpoints`).

    Args:
        model: The model (modified in place).
        loss_fn: Loss function.
        data: Training data.
        config: Hyper-parameters.
        checkpoint_dir: Folder of this run's checkpoints.
        save_steps: Steps (``0`` = initialisation) to checkpoint at; the final step is
            always checkpointed.
        progress: Show a tqdm progress bar. Default: ``True``.
        callbacks: Further callbacks of the loop, called after the checkpointing.
            Default: none.

    Returns:
        The training log with columns ``step``, ``loss``, ``accuracy`` (per batch).

    """
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), lr=config.lr, momentum=config.momentum
    )
    stops = sorted(
        {s for s in save_steps if 0 <= s <= config.num_steps} | {config.num_steps}
    )
    start, state = resume_point(checkpoint_dir, stops, config)
    log = []
    if state is not None:
        restore(state, model, optimizer, checkpoint_path(checkpoint_dir, start))
        log = list(state["log"])
        stops = [s for s in stops if s > start]
    checkpoints = Checkpoints(checkpoint_dir, stops, config, log)
    bar = Progress(config.num_steps, start, enabled=progress)
    train_loop(
        LoopState(model, loss_fn, optimizer, data, step=start),
        batch_size=config.batch_size,
        seed=config.seed,
        until=lambda s: s.step >= config.num_steps,
        callbacks=[checkpoints, *callbacks, bar],
    )
    return pd.DataFrame(checkpoints.log, columns=["step", "loss", "accuracy"])
