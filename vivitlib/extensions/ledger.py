"""BackPACK's store of backpropagated quantities, aware of who else holds them.

The factor extension's rules multiply a backpropagated factor **in place**
when nothing else can see it (:func:`may_overwrite`): the ledger confirms that
no other stored quantity (a residual sum hands one tensor to both branches),
no lazy factor's source and no *pinned* tensor -- a quantity a parameter's
factor may keep -- shares its memory.
"""

from __future__ import annotations

import weakref
from typing import Any

from backpack.extensions.saved_quantities import SavedQuantities
from torch import Tensor

from vivitlib.extensions.lazy import LazyColumns, materialised


class QuantityLedger(SavedQuantities):
    """BackPACK's store of backpropagated quantities, aware of who else holds them.

    Besides the stored quantities it keeps weak references to *pinned* tensors:
    quantities a parameter's factor may keep (a view or the tensor itself).
    """

    def __init__(self):
        super().__init__()
        self._quantities: dict[int, Any] = {}
        self._pins: dict[int, weakref.ref] = {}

    def save_quantity(self, key: int, quantity, accumulation_function) -> None:
        """Store ``quantity`` under ``key``, accumulating onto an existing one.

        A lazy factor meeting another quantity (a residual sum) is formed first.
        """
        if key in self._quantities:
            existing = materialised(self._quantities.pop(key))
            quantity = accumulation_function(existing, materialised(quantity))
        self._quantities[key] = quantity

    def materialise(self, key: int) -> None:
        """Form the lazy factor stored under ``key`` (for a rule needing it whole)."""
        quantity = self._quantities.get(key)
        if isinstance(quantity, LazyColumns):
            self._quantities[key] = quantity.materialise()

    def retrieve_quantity(self, key: int, delete_old: bool):
        """The quantity stored under ``key`` (removed if ``delete_old``), or None."""
        if delete_old:
            return self._quantities.pop(key, None)
        return self._quantities.get(key, None)

    def __len__(self) -> int:
        return len(self._quantities)

    def clear(self) -> None:
        """Drop every stored quantity and pin (e.g. leftovers of an aborted pass)."""
        self._quantities.clear()
        self._pins.clear()

    def pin(self, key: int) -> None:
        """Record that the quantity stored under ``key`` may be kept elsewhere."""
        for tensor in _tensors(self._quantities.get(key)):
            self._pins[id(tensor)] = weakref.ref(tensor)

    def is_exclusive(self, tensor: Tensor) -> bool:
        """Whether no stored or pinned tensor shares ``tensor``'s memory."""
        ptr = tensor.untyped_storage().data_ptr()
        self._pins = {k: r for k, r in self._pins.items() if r() is not None}
        held = [r() for r in self._pins.values()]
        for quantity in self._quantities.values():
            held.extend(_tensors(quantity))
        return all(t.untyped_storage().data_ptr() != ptr for t in held)


def _tensors(quantity) -> list[Tensor]:
    if isinstance(quantity, Tensor):
        return [quantity]
    if isinstance(quantity, LazyColumns):
        return [quantity.source]
    if isinstance(quantity, (list, tuple)):
        return [t for t in quantity if isinstance(t, Tensor)]
    return []


def may_overwrite(ext: Any, mat: Any) -> bool:
    """Whether ``ext``'s backpropagated ``mat`` may be modified in place."""
    ledger = getattr(ext, "saved_quantities", None)
    return (
        isinstance(ledger, QuantityLedger)
        and isinstance(mat, Tensor)
        and not mat.requires_grad
        and mat.is_contiguous()
        and ledger.is_exclusive(mat)
    )
