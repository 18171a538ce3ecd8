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
import os
import pickle
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.common.data import ImageData
from experiments.common.files import CorruptFileError, atomic_write

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


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is stored."""
    return Path(folder) / f"step{step:07d}.pt"


def checkpoint_steps(folder: Path) -> dict[int, Path]:
    """The checkpoints in ``folder`` by step (damaged ones included)."""
    found = {}
    for path in Path(folder).glob("step*.pt") if Path(folder).exists() else ():
        digits = path.stem[len("step") :]
        if digits.isdigit():
            found[int(digits)] = path
    return dict(sorted(found.items()))


def latest_checkpoint(folder: Path) -> Path | None:
    """Find the checkpoint with the largest step in ``folder``, or ``None``."""
    found = checkpoint_steps(folder)
    return found[max(found)] if found else None


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer,
    step: int,
    log: list,
    config: TrainConfig | None = None,
) -> None:
    """Save model, optimizer, RNG state, step, log (and config) atomically.

    The file is written under a unique temporary name and renamed, so a killed run
    leaves either the previous file or the complete new one.
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "step": step,
        "log": list(log),
    }
    if config is not None:
        state["config"] = resume_record(config)
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path) -> dict:
    """Load and check a checkpoint without executing anything stored in it.

    Loads with ``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers only, so a crafted file cannot run code.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CorruptFileError: If the file is truncated, damaged, holds other objects or
            does not describe step ``N`` of its name ``stepN.pt``; the message names
            the file and the fix.

    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CorruptFileError(_damaged(path, "it is not a file"))
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; re-run to train.")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        reason = (
            "it holds objects other than tensors, numbers and containers, refused by "
            "torch.load(weights_only=True): loading it fully could run code"
        )
        raise CorruptFileError(_damaged(path, reason)) from err
    except Exception as err:  # torch raises many types for damaged files
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CorruptFileError(
            _damaged(path, f"{type(err).__name__}: {first}")
        ) from err
    problem = _structure_problem(state, path)
    if problem:
        raise CorruptFileError(_damaged(path, problem))
    return state


def load_checkpoint(
    path: Path, model: nn.Module, optimizer=None, config: TrainConfig | None = None
) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; return the stored state.

    Args:
        path: The checkpoint.
        model: Receives the stored weights.
        optimizer: Receives the stored optimizer state, if given.
        config: If given, the checkpoint must have been written for it (all
            hyper-parameters but ``num_steps``).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CorruptFileError: If it is damaged (see :func:`read_checkpoint`).
        ValueError: If it was written for another configuration, model or optimizer.

    """
    path = Path(path)
    state = read_checkpoint(path)
    if config is not None:
        _check_config(state, path, config)
    _restore(state, model, optimizer, path)
    return state


def resume_record(config: TrainConfig) -> dict:
    """The hyper-parameters a checkpoint must share with a run to resume it.

    Everything but ``num_steps``: batches are a function of ``(seed, step)`` and the
    learning rate is constant, so the state at step ``s`` does not depend on the
    total number of steps, and a longer run continues from a shorter one's files.
    """
    record = asdict(config)
    record.pop("num_steps")
    return record


def resume_point(
    folder: Path, stops: Iterable[int], config: TrainConfig
) -> tuple[int, dict | None]:
    """Find where training resumes: the latest usable checkpoint.

    A checkpoint at step ``s`` is usable if it loads and matches ``config``, if
    ``s <= config.num_steps``, and if every required step in ``stops`` before ``s``
    has a usable checkpoint (otherwise that one is recomputed by resuming earlier).
    Damaged checkpoints are renamed to ``*.pt.damaged`` (kept for inspection) with a
    warning and recomputed.

    Returns:
        ``(step, state)``, or ``(0, None)`` to start from the initialisation.

    Raises:
        ValueError: If a checkpoint was written for other hyper-parameters.

    """
    stops = set(stops)
    found = {}
    for step, path in checkpoint_steps(folder).items():
        if not path.is_file():  # would block the checkpoint written there later
            _set_aside(path, CorruptFileError(_damaged(path, "it is not a file")))
        elif step <= config.num_steps:
            found[step] = path
    limit = min((s for s in stops if s not in found), default=config.num_steps + 1)
    best: tuple[int, dict | None] = (0, None)
    for step, path in found.items():
        if step > limit:
            break
        try:
            state = read_checkpoint(path)
        except CorruptFileError as err:
            _set_aside(path, err)
            limit = min(limit, step) if step in stops else limit
            continue
        _check_config(state, path, config)
        best = (step, state)
    return best


def _structure_problem(state: object, path: Path) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint dict"
    missing = {"model", "optimizer", "rng", "step", "log"} - set(state)
    if missing:
        return f"keys {sorted(missing)} are missing"
    types = {"model": dict, "optimizer": dict, "rng": Tensor, "step": int}
    for key, kind in types.items():
        if not isinstance(state[key], kind):
            return f"its {key!r} is a {type(state[key]).__name__}"
    if state["rng"].dtype != torch.uint8:
        return "its RNG state is not a byte tensor"
    digits = Path(path).stem[len("step") :]
    if digits.isdigit() and state["step"] != int(digits):
        return f"it holds step {state['step']}, its name says {int(digits)}"
    if not isinstance(state["log"], list) or len(state["log"]) != state["step"]:
        return "its training log does not have one entry per step"
    return None


def _damaged(path: Path, reason: str) -> str:
    return (
        f"Checkpoint {path} is damaged or not a checkpoint of this project ({reason}). "
        "Delete it and re-run: training resumes from the previous checkpoint."
    )


def _set_aside(path: Path, err: Exception) -> None:
    target = path.with_name(path.name + ".damaged")
    try:
        os.replace(path, target)
        where = f"moved to {target}"
    except OSError:
        where = "left in place"
    warnings.warn(
        f"{err} It was {where}; recomputing it from an earlier checkpoint.",
        UserWarning,
        stacklevel=3,
    )


def _check_config(state: dict, path: Path, config: TrainConfig) -> None:
    stored, expected = state.get("config"), resume_record(config)
    if stored is not None and stored != expected:
        raise ValueError(
            f"Checkpoint {path} was written for {stored}, this run has {expected}. "
            "Pass another --out or delete the folder "
            f"{Path(path).parent} to train again."
        )


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
        _restore(state, model, optimizer, checkpoint_path(checkpoint_dir, start))
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


def _restore(state: dict, model: nn.Module, optimizer, path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"Checkpoint {path} does not fit this model or optimizer ({first}); it "
            f"was written for another version of the problem. Delete {path.parent} "
            "or pass another --out to train again."
        ) from err
    torch.set_rng_state(state["rng"])


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
