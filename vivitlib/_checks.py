"""Validation helpers shared by the whole package: one place for every input rule."""

from __future__ import annotations

import math
import numbers
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


def check_int_at_least(value: object, name: str, minimum: int) -> int:
    """Return ``value`` as ``int`` if it is an integer of at least ``minimum``.

    Python and numpy integers are accepted; ``bool`` and floats are not.

    Args:
        value: The argument to check.
        name: Its name, as the user passed it (used in messages).
        minimum: The smallest allowed value.

    Returns:
        ``value`` as a Python ``int``.

    Raises:
        TypeError: If ``value`` is not an integer.
        ValueError: If ``value`` is smaller than ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__} {value!r}; pass "
            f"a whole number such as {name}={max(minimum, 1)}."
        )
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return value


def check_positive_float(value: object, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` as ``float`` if it is a finite positive (or zero) number.

    Args:
        value: The argument to check.
        name: Its name, as the user passed it (used in messages).
        allow_zero: Whether 0 is allowed. Default ``False``.

    Returns:
        ``value`` as a Python ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is negative, NaN, infinite (or zero when not
            allowed).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float, got {type(value).__name__} {value!r}."
        )
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value}.")
    return value


def check_generator(generator: object) -> torch.Generator:
    """Return ``generator``, or a new one seeded with 0 when it is ``None``.

    Args:
        generator: ``None`` or a ``torch.Generator``.

    Returns:
        A ``torch.Generator``.

    Raises:
        TypeError: If ``generator`` is neither ``None`` nor a ``torch.Generator``.
    """
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (e.g. "
            f"torch.Generator().manual_seed(0)), got {type(generator).__name__}."
        )
    return generator


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
