"""Parameter groups: normalise user input, and one group per layer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.nn import Module, Parameter


def layerwise_groups(model: Module) -> list[dict[str, Any]]:
    """One parameter group per module that owns trainable parameters directly.

    Args:
        model: The network.

    Returns:
        ``[{"params": [...], "name": module_name}, ...]`` in module order; pass it
        to :class:`vivitlib.LowRankGGN` for a block-diagonal (per-layer) GGN.
    """
    groups = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            groups.append({"params": params, "name": name})
    return groups


def normalize_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Turn parameters or ``{"params": ...}`` dicts into a list of group dicts.

    Args:
        params: An iterable of tensors (one group), or of dicts with key
            ``"params"`` (one group each; other keys are kept).

    Returns:
        List of group dicts whose ``"params"`` is a list of tensors.

    Raises:
        TypeError: On entries that are neither tensors nor group dicts.
        ValueError: On an empty group (parameters with ``requires_grad=False``
            are skipped), or a parameter listed twice (in one group or in two).
    """
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be an iterable of tensors or of {'params': ...} dicts, "
            "got a single tensor; wrap it in a list."
        )
    entries = list(params)
    if not entries:
        raise ValueError("params is empty; pass model.parameters() or groups.")
    if all(isinstance(e, dict) for e in entries):
        groups = [dict(e) for e in entries]
    elif any(isinstance(e, dict) for e in entries):
        raise TypeError("params mixes tensors and group dicts; use one kind.")
    else:
        groups = [{"params": entries}]
    seen: dict[int, int] = {}
    for index, group in enumerate(groups):
        group["params"] = _group_params(group, index)
        for p in group["params"]:
            if id(p) in seen:
                where = "twice in" if seen[id(p)] == index else "in two groups:"
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} is listed {where} "
                    f"group {seen[id(p)]} and group {index}; each parameter may "
                    "belong to one group only."
                )
            seen[id(p)] = index
    return groups


def _group_params(group: dict[str, Any], index: int) -> list[Tensor]:
    if "params" not in group:
        raise ValueError(f"Group {index} has no 'params' key.")
    raw = group["params"]
    params = [raw] if isinstance(raw, Tensor) else list(raw)
    if not params:
        raise ValueError(f"Group {index} is empty; every group needs parameters.")
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"Group {index} holds {type(p)}, expected tensors.")
    params = [p for p in params if p.requires_grad]  # frozen ones carry no curvature
    if not params:
        raise ValueError(
            f"Group {index} has no parameter with requires_grad=True; frozen "
            "parameters are skipped, so unfreeze some or drop the group."
        )
    for p in params:
        if not isinstance(p, Parameter) and not p.is_leaf:
            raise ValueError(f"Group {index} holds a non-leaf tensor; pass parameters.")
    return params
