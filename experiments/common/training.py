"""Training with SGD or Adam, checkpointed so that an interrupted run resumes exactly.

Mini-batches are a pure function of ``(seed, step)``: epoch ``e`` uses a permutation of
the training set drawn from a generator seeded with ``(seed, e)``, and the incomplete
last batch is dropped. A checkpoint holds model, optimizer, torch RNG state, step and
the training log, so resuming from it continues bit-for-bit like an uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.common.data import ImageData

OPTIMIZERS = ("sgd", "adam")


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


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is stored."""
    return Path(folder) / f"step{step:07d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    """Find the checkpoint with the largest step in ``folder``, or ``None``."""
    found = sorted(Path(folder).glob("step*.pt")) if Path(folder).exists() else []
    return found[-1] if found else None


def save_checkpoint(
    path: Path, model: nn.Module, optimizer, step: int, log: list
) -> None:
    """Save model, optimizer, torch RNG state, step and log atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "step": step,
        "log": list(log),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer=None) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; return the stored state."""
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state


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

    If ``checkpoint_dir`` holds checkpoints, training resumes from the latest one;
    if that is the final step, nothing is trained. Studies evaluate the checkpoints
    afterwards (see :func:`experiments.common.study.evaluate_checkpoints`).

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
    start, log = 0, []
    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        start, log = state["step"], state["log"]
        stops = [s for s in stops if s >= start]
    bar = tqdm(
        total=config.num_steps, initial=start, disable=not progress, desc="train"
    )
    for step in range(start, config.num_steps + 1):
        if stops and step == stops[0]:
            stops.pop(0)
            save_checkpoint(
                checkpoint_path(checkpoint_dir, step), model, optimizer, step, log
            )
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
    loss.backward()
    optimizer.step()
    accuracy = (output.argmax(1) == labels).float().mean().item()
    return {"step": step, "loss": loss.item(), "accuracy": accuracy}


def config_dict(config: TrainConfig) -> dict:
    """Return the configuration as a plain dict."""
    return asdict(config)
