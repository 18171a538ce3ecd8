"""NaN/Inf flags computed without a device synchronisation, resolved together."""

from __future__ import annotations

import torch
from torch import Tensor


def nonfinite_flag(tensor: Tensor) -> Tensor:
    """Return a 0-d bool tensor, ``True`` if ``tensor`` holds NaN or Inf (no sync).

    A float64 sum is finite only if every entry is (finite float32/float64
    entries cannot overflow it in practice), so one reduction suffices.
    """
    if not tensor.is_floating_point():
        return torch.zeros((), dtype=torch.bool, device=tensor.device)
    return ~torch.isfinite(tensor.sum(dtype=torch.float64))


def resolve_flags(flags: list[bool | Tensor]) -> list[bool]:
    """Return ``flags`` as Python bools, synchronising once per device."""
    out: list[bool | None] = [f if isinstance(f, bool) else None for f in flags]
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        if not isinstance(f, bool):
            by_device.setdefault(f.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([flags[i].reshape(()) for i in idx]).tolist()
        for i, value in zip(idx, values):
            out[i] = bool(value)
    return out
