"""Memory budget of a curvature pass (``max_memory=``), and how it is spent.

A :class:`MemoryBudget` bounds the **working memory** of a pass: the buffers
vivitlib itself holds at any moment while BackPACK walks the network -- the
backpropagated factor ``[C, N, *features]``, a layer's factor pieces (its
unfolded input, slices of its dense ``V``), the contraction kernels'
intermediates. Not counted: what a plain backward pass holds anyway (model,
forward activations, ``.grad``, autograd's gradients) and the pass's results
(the ``NC × NC`` Gram accumulator, factors kept for lifting). So the peak of a
pass is about the plain backward's plus ``max_memory``.

The budget is spent in fixed shares (:meth:`MemoryBudget.split`), small
enough that the pieces alive together at one layer's step stay within it:

* a backpropagated factor larger than :attr:`~MemoryBudget.lazy_bytes` (an
  eighth, :data:`LAZY_SHARE`) is not formed: it stays **lazy**, its source
  plus the pending per-column operations
  (:class:`vivitlib.extensions.lazy.LazyColumns`), and its consumers form a
  few columns (:attr:`~MemoryBudget.column_bytes`, a sixteenth) -- for a
  block of samples at a time where one column is larger -- or a slice of
  channels at a time: a convolution with a small dense ``V`` by columns, one
  with a large ``V`` by output channels for its ``'dense'`` Gram plan;
* a convolution's unfolded input (``kernel size`` times its input) larger
  than :attr:`~MemoryBudget.lazy_bytes` is unfolded a block of samples at a
  time, within :attr:`~MemoryBudget.column_bytes`, whenever a kernel needs it
  (:func:`vivitlib.extensions.layers.conv_input_blocks`);
* the kernels' slices and chunks (:class:`vivitlib.factors.CostModel`'s
  ``materialise_elements``: a quarter; ``chunk_elements`` and
  ``workspace_elements``: an eighth each); the ``'pairwise'`` Gram plan lays
  its operands out for all samples at once only when they fit
  ``chunk_elements``, else two blocks of samples at a time.

What cannot be split -- the lazy source (a factor formed further up),
results kept for lifting (``compute`` with eigenvectors or Newton steps), the
pooling indices and masks the pending maps hold -- sets the smallest peak a
network allows (``max_memory=1``; at ``N = 64``: 1.3 times a plain gradient's
peak on 3C3D, 1.2 on 2C2D, 1.5 on All-CNN-C,
``experiments/benchmarks/ggn/reference/budgets_session7.md``).

Without a budget (``max_memory=None``) the defaults apply: the cost model as
it is, and factors above :data:`DEFAULT_LAZY_BYTES` kept lazy (which costs no
time: each column is still formed once). A convolution that forms its factor by
slices of output channels first forms the maps behind a previous
convolution's ``Jᵀ`` once (:func:`vivitlib.extensions.lazy_layers.sliceable`);
under a budget only where that fits :attr:`~MemoryBudget.lazy_bytes`.

A budget that a layer cannot meet (its smallest working set -- one sample's
column of its factor, the lazy source -- is larger) is not an error: the pass runs
with the smallest working set and emits one :class:`MemoryBudgetWarning` naming
the layer and the budget that would have been honoured.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

#: Without a budget, a backpropagated factor above this many bytes stays lazy.
#: At 32 MiB DeepOBS 3C3D's second convolution's output factor (30 MiB at
#: ``N = 64``) was formed whole, and a pass after a warm-up peaked at 157 MiB
#: above set-up, 3.1 times a plain gradient's 50 MiB; at 16 MiB 118 MiB
#: (2.4 times; 2C2D 139 -> 129, All-CNN-C 161 -> 143 MiB), in the same time.
DEFAULT_LAZY_BYTES = 16 * 2**20

#: Under a budget, a formed factor (or unfolded input) may take ``1/LAZY_SHARE``
#: of it and a chunk of lazy columns ``1/COLUMN_SHARE``. Up to three such
#: pieces live at once at a convolution's step (its output factor, unfolded
#: input and input factor) next to the kernels' slices and the lazy source
#: kept from above; with a quarter and an eighth, 3C3D at ``N = 64`` exceeded a
#: budget of half a plain gradient's peak by 7 MiB (116.7 MiB for a limit of
#: 109), with an eighth and a sixteenth it peaks at 100.8 MiB (1.68 instead of
#: 1.27 s; ``experiments/benchmarks/ggn/budgets.py``).
LAZY_SHARE, COLUMN_SHARE = 8, 16

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


class MemoryBudgetWarning(UserWarning):
    """A layer needed more working memory than ``max_memory`` allows."""


def parse_memory(value: object, name: str = "max_memory") -> int | None:
    """Bytes given as an int or a string such as ``"512MiB"`` or ``"1.5 GB"``.

    Args:
        value: ``None``, a positive int (bytes) or a string: a positive number
            with an optional unit ``B``, ``kB``/``MB``/``GB``/``TB`` (powers of
            1000) or ``KiB``/``MiB``/``GiB``/``TiB`` (powers of 1024), any case.
        name: Argument name used in error messages.

    Returns:
        The number of bytes, or ``None``.

    Raises:
        TypeError: If ``value`` is neither ``None``, an int nor a string.
        ValueError: If it is not positive or the string cannot be read.

    Example:
        >>> parse_memory("512MiB")
        536870912
        >>> parse_memory("1.5 GB")
        1500000000
    """
    if value is None:
        return None
    if isinstance(value, str):
        match = _PATTERN.match(value.lower())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(
                f"{name}={value!r} is not a memory size; write bytes as an int or "
                "a string like '512MiB', '2GiB' or '1.5GB'."
            )
        number = float(match.group(1)) * _UNITS[match.group(2)]
    elif isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float):
            raise TypeError(
                f"{name} must be an int (bytes) or a string like '512MiB', got the "
                f"float {value!r}; write int({value!r}) or a string with a unit."
            )
        raise TypeError(
            f"{name} must be an int (bytes), a string like '512MiB' or None, got "
            f"{type(value).__name__}."
        )
    else:
        number = value
    if number < 1:
        raise ValueError(
            f"{name}={value!r} must be positive; give the working memory the pass "
            "may use (e.g. '256MiB'), or None for the default behaviour."
        )
    return int(number)


@dataclass(frozen=True)
class MemoryBudget:
    """How a pass spends its working memory.

    Attributes:
        total_bytes: The budget (``max_memory``), or ``None`` for the defaults.
        lazy_bytes: A backpropagated factor larger than this stays lazy.
        column_bytes: Largest chunk of factor columns formed at a time.
        lifted_vectors: How many vectors the kept factors will be applied to
            after the pass, if known (``1`` when a Newton step is the only
            result needing them); ``None``: unknown. Passed on to
            :attr:`vivitlib.factors.CostModel.lifted_vectors`.
    """

    total_bytes: int | None = None
    lazy_bytes: int = DEFAULT_LAZY_BYTES
    column_bytes: int = 8 * 2**20
    lifted_vectors: int | None = None
    _warned: list = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def split(
        cls, total_bytes: int | None, lifted_vectors: int | None = None
    ) -> MemoryBudget:
        """The shares of ``total_bytes`` (see the module doc); defaults for ``None``."""
        if total_bytes is None:
            return cls(lifted_vectors=lifted_vectors)
        return cls(
            total_bytes=total_bytes,
            lazy_bytes=max(1, total_bytes // LAZY_SHARE),
            column_bytes=max(1, total_bytes // COLUMN_SHARE),
            lifted_vectors=lifted_vectors,
        )

    def cost_settings(self, itemsize: int) -> dict[str, int]:
        """Kernel settings for :func:`vivitlib.factors.cost_model` (entries).

        Args:
            itemsize: Bytes per entry of the factors (4 for float32).
        """
        settings = {}
        if self.lifted_vectors is not None:
            settings["lifted_vectors"] = self.lifted_vectors
        if self.total_bytes is None:
            return settings
        from vivitlib.factors import current_cost_model

        defaults = current_cost_model()
        eighth = max(1, self.total_bytes // (8 * itemsize))
        # thin V slices make small GEMMs: a quarter for them (3C3D, N = 64, at
        # 24 MiB: 5.7 s with an eighth, 3.5 s with a quarter, 2.7 s unbudgeted)
        quarter = max(1, self.total_bytes // (4 * itemsize))
        return {
            **settings,
            "materialise_elements": min(defaults.materialise_elements, quarter),
            "chunk_elements": min(defaults.chunk_elements, eighth),
            "workspace_elements": min(defaults.workspace_elements, eighth),
        }

    def keeps_lazy(self, nbytes: int) -> bool:
        """Whether a factor of ``nbytes`` stays lazy (above :attr:`lazy_bytes`)."""
        return nbytes > self.lazy_bytes

    def columns_per_chunk(self, column_bytes: int, total: int) -> int:
        """Columns formed at a time when one column takes ``column_bytes``."""
        return max(1, min(total, self.column_bytes // max(column_bytes, 1)))

    def note_excess(self, where: str, needed_bytes: int) -> None:
        """Warn (once per budget and layer kind) that ``where`` needed more.

        Args:
            where: The layer and what it needed, for the message.
            needed_bytes: Smallest working memory that layer could use.
        """
        if self.total_bytes is None or needed_bytes <= self.total_bytes:
            return
        if where in self._warned:
            return
        self._warned.append(where)
        warnings.warn(
            f"max_memory={self.total_bytes} bytes is below what {where} needs at "
            f"least ({needed_bytes} bytes, {needed_bytes / 2**20:.1f} MiB), so the "
            "pass used more there (the numbers are unaffected). Raise max_memory "
            f"to at least {needed_bytes} bytes to stay within it.",
            MemoryBudgetWarning,
            stacklevel=2,
        )


_CURRENT: ContextVar[MemoryBudget] = ContextVar(
    "vivitlib_memory_budget",
    default=MemoryBudget(),  # noqa: B039 (frozen)
)


def current_budget() -> MemoryBudget:
    """The memory budget in effect (defaults outside a budgeted pass)."""
    return _CURRENT.get()


@contextmanager
def memory_budget(budget: MemoryBudget, itemsize: int = 4) -> Iterator[MemoryBudget]:
    """Apply ``budget`` (and the kernel settings it implies) inside a block.

    Args:
        budget: The pass's budget.
        itemsize: Bytes per factor entry (sets the kernels' chunk sizes).
    """
    from vivitlib.factors import cost_model

    token = _CURRENT.set(budget)
    try:
        with cost_model(**budget.cost_settings(itemsize)):
            yield budget
    finally:
        _CURRENT.reset(token)
