"""Checkpoints: atomic saves, safe loads (``weights_only``) and where to resume.

A checkpoint ``stepNNNNNNN.pt`` holds model, optimizer, torch RNG state, step, the
training log and the run's hyper-parameters. It is written atomically and read with
``torch.load(weights_only=True)``, so no code stored in a file is ever executed; a
damaged one is set aside (``*.pt.damaged``) and recomputed from the one before.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from experiments.common.files import CorruptFileError, atomic_write

if TYPE_CHECKING:
    from experiments.common.resumable import TrainConfig


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
    restore(state, model, optimizer, path)
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


def restore(state: dict, model: nn.Module, optimizer, path: Path) -> None:
    """Put a checkpoint's ``state`` (read from ``path``) into model, optimizer, RNG.

    Raises:
        ValueError: If the state does not fit the model or optimizer; the message
            names ``path`` and the fix.

    """
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
