"""Training with SGD or Adam, checkpointed so that an interrupted run resumes exactly.

Mini-batches are a pure function of ``(seed, step)``: epoch ``e`` uses a permutation of
the training set drawn from a generator seeded with ``(seed, e)``, and the incomplete
last batch is dropped. A checkpoint holds model, optimizer, torch RNG state, step and
the training log, so resuming from it continues bit-for-bit like an uninterrupted run.
Checkpoints are written atomically and read with ``torch.load(weights_only=True)``
(no code in a file is ever executed); a damaged one is set aside and recomputed from
the checkpoint before it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.common.checkpoints import (  # noqa: F401 - re-exported
    checkpoint_path,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    restore,
    resume_point,
    resume_record,
    save_checkpoint,
)
from experiments.common.data import ImageData

OPTIMIZERS = ("sgd", "adam")

#: torch's warning about the full backward hooks ``backpack.extend`` registers.
HOOK_WARNING = "Full backward hook is firing"


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
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}."
            )
        if self.batch_size < 1 or self.num_steps < 0:
            raise ValueError("batch_size must be >= 1 and num_steps >= 0.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")


def make_optimizer(
    config: TrainConfig, params: Iterable[Tensor]
) -> torch.optim.Optimizer:
    """Create the optimizer named in ``config``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(params, lr=config.lr)


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


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    data: ImageData,
    config: TrainConfig,
    checkpoint_dir: Path,
    save_steps: Iterable[int] = (),
    progress: bool = True,
) -> pd.DataFrame:
    """Train ``model``, writing checkpoints at ``save_steps``.

    Training resumes from the latest usable checkpoint in ``checkpoint_dir`` (see
    :func:`resume_point`): after an interruption, with more steps than before
    (continuing the shorter run), or from before a missing or damaged checkpoint of
    ``save_steps``. If every checkpoint is present, nothing is trained or written.
    Studies evaluate the checkpoints afterwards (see
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

    Returns:
        The training log with columns ``step``, ``loss``, ``accuracy`` (per batch).

    """
    optimizer = make_optimizer(config, model.parameters())
    stops = sorted(
        {s for s in save_steps if 0 <= s <= config.num_steps} | {config.num_steps}
    )
    start, state = resume_point(checkpoint_dir, stops, config)
    log = []
    if state is not None:
        restore(state, model, optimizer, checkpoint_path(checkpoint_dir, start))
        log = list(state["log"])
        stops = [s for s in stops if s > start]
    bar = tqdm(
        total=config.num_steps, initial=start, disable=not progress, desc="train"
    )
    for step in range(start, config.num_steps + 1):
        if stops and step == stops[0]:
            stops.pop(0)
            path = checkpoint_path(checkpoint_dir, step)
            save_checkpoint(path, model, optimizer, step, log, config)
        if step == config.num_steps:
            break
        log.append(_train_step(model, loss_fn, data, config, optimizer, step))
        bar.update()
    bar.close()
    return pd.DataFrame(log, columns=["step", "loss", "accuracy"])


def _train_step(model, loss_fn, data, config, optimizer, step) -> dict:
    idx = batch_indices(len(data.train_y), config.batch_size, step, config.seed)
    inputs, labels = data.train_x[idx], data.train_y[idx]
    optimizer.zero_grad()
    output = model(inputs)
    loss = loss_fn(output, labels)
    with warnings.catch_warnings():
        # BackPACK's hooks on the extended model, not the user's concern
        warnings.filterwarnings("ignore", HOOK_WARNING, UserWarning)
        loss.backward()
    optimizer.step()
    accuracy = (output.argmax(1) == labels).float().mean().item()
    return {"step": step, "loss": loss.item(), "accuracy": accuracy}


def config_dict(config: TrainConfig) -> dict:
    """Return the configuration as a plain dict."""
    return asdict(config)
