"""Warnings of the library: torch's hook warning silenced narrowly, deprecated names."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


class DeprecatedAlias:
    """Read-only class attribute that forwards to ``new`` with a ``DeprecationWarning``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Result:
        ...     evals: list
        ...     eigenvalues = DeprecatedAlias("evals")
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     Result([2.0]).eigenvalues
        [2.0]
        >>> print(caught[0].message)
        Result.eigenvalues is deprecated; use Result.evals (the library's name).
    """

    def __init__(self, new: str) -> None:
        """Forward to the attribute named ``new``."""
        self.new = new
        self.old = ""
        self.__doc__ = f"Deprecated alias of :attr:`{new}` (``DeprecationWarning``)."

    def __set_name__(self, owner: type, name: str) -> None:
        """Record the deprecated name."""
        self.old = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        """Warn, then return ``obj.<new>`` (the descriptor itself on the class)."""
        if obj is None:
            return self
        cls = type(obj).__name__
        warnings.warn(
            f"{cls}.{self.old} is deprecated; use {cls}.{self.new} (the library's "
            "name).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(obj, self.new)
