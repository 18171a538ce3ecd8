"""Validation helpers shared by the whole package: one place for every input rule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_NO_PASS_HINT = (
    "Run the forward and backward pass inside "
    "`with backpack(*ggn.extensions, extension_hook=ggn.hook):` first."
)


def check_indices(
    indices: Sequence[int] | Tensor | None, name: str
) -> list[int] | None:
    """Validate sample indices given at construction (range is checked per batch).

    Args:
        indices: ``None`` (all samples) or a sequence of non-negative, distinct ints.
        name: Argument name used in error messages.

    Returns:
        The indices as a list of ints, or ``None``.

    Raises:
        TypeError: If the indices are not integers.
        ValueError: If the indices are empty, negative or repeated.
    """
    if indices is None:
        return None
    if isinstance(indices, Tensor):
        if indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"{name} must hold integers, got a {indices.dtype} tensor.")
        indices = indices.flatten().tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise TypeError(f"{name} must be a sequence of ints or None, got {indices!r}.")
    out = list(indices)
    for idx in out:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"{name} must hold ints, got {idx!r} of type {type(idx)}.")
    if not out:
        raise ValueError(f"{name} is empty; pass None to use every sample.")
    if min(out) < 0:
        raise ValueError(f"{name} holds negative index {min(out)}; use indices >= 0.")
    if len(set(out)) != len(out):
        dupes = sorted({i for i in out if out.count(i) > 1})
        raise ValueError(f"{name} holds duplicate indices {dupes}; list each once.")
    return out


def check_indices_in_range(indices: list[int] | None, batch_size: int, name: str):
    """Check that sample indices address the current mini-batch.

    Raises:
        ValueError: If an index is ``>= batch_size``.
    """
    if indices is not None and max(indices) >= batch_size:
        raise ValueError(
            f"{name} holds index {max(indices)}, but the mini-batch has only "
            f"{batch_size} samples; use indices in [0, {batch_size})."
        )


def check_finite(tensor: Tensor, what: str, fix: str) -> None:
    """Raise ``ValueError`` if ``tensor`` has a NaN or Inf entry."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} contains NaN or Inf. {fix}")


def check_positive_int(value: int, name: str, allow_zero: bool = False) -> int:
    """Validate an integer hyper-parameter."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


def check_damping(damping: float | Tensor, num_directions: int) -> Tensor:
    """Turn a scalar or per-direction damping into a float64 tensor of shape [K].

    ``inf`` entries mean 'no step along this direction'.

    Raises:
        ValueError: On a negative or NaN damping, or a wrong shape.
    """
    if isinstance(damping, Tensor):
        delta = damping.detach().to(torch.float64).cpu()
        if delta.ndim == 0:
            delta = delta.expand(num_directions)
        if delta.shape != (num_directions,):
            raise ValueError(
                f"damping must be a scalar or have shape [{num_directions}] "
                f"(one per direction), got {tuple(delta.shape)}."
            )
    else:
        if not isinstance(damping, (int, float)) or math.isnan(damping):
            raise ValueError(f"damping must be a number >= 0, got {damping!r}.")
        delta = torch.full((num_directions,), float(damping), dtype=torch.float64)
    if bool(torch.isnan(delta).any()) or bool((delta < 0).any()):
        raise ValueError("damping must be >= 0 (inf = no step) and not NaN.")
    return delta
