"""Narrow silencing of torch's warning about BackPACK's module hooks."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: Start of torch's warning for a full backward hook on a module whose inputs
#: need no gradient (BackPACK's hooks on the first layer of an extended model).
BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


@contextmanager
def quiet_backward_hook_warning() -> Iterator[None]:
    """Ignore exactly that warning inside the block (our own products)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=BACKWARD_HOOK_WARNING, category=UserWarning
        )
        yield
