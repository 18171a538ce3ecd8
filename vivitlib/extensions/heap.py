"""Large CPU buffers allocated after the C heap's free pages are handed back.

Before a rule allocates a large CPU output (max pooling's is several times its
input), it hands the C heap's free pages back to the operating system
(:func:`release_free_heap`, :func:`new_zeros`): glibc keeps freed blocks
below its dynamic mmap threshold (up to 32 MiB) in the heap, while a block
above it is mapped afresh, so without the release the retained free heap and
the new buffer add up in the resident memory (3C3D: full compute at
``N = 64`` peaks at 406 instead of 451 MiB, eigenvalues at ``N = 256`` at
1180 instead of 1250 MiB); it costs a few milliseconds per call. (Backing
such an output by transparent huge pages halves its zero-filling in
isolation, but with the kernel's default ``defrag=madvise`` the faults then
compact memory: the whole pass became 0.1-0.8 s slower and erratic on 3C3D at
``N = 64``, so it is not done.)
"""

from __future__ import annotations

import ctypes
import functools
from math import prod

from torch import Tensor

#: Outputs of at least this many bytes are allocated after :func:`release_free_heap`.
RELEASE_HEAP_BYTES = 32 * 2**20


@functools.cache
def _malloc_trim():
    """The C library's ``malloc_trim`` (glibc), or ``None`` where it lacks one."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim``).

    Purely an allocator hint: no tensor is touched. A no-op where the C library
    has no ``malloc_trim`` (macOS, musl).

    Returns:
        Whether ``malloc_trim`` was called.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def new_zeros(like: Tensor, *shape: int) -> Tensor:
    """``like.new_zeros(shape)``, releasing free heap first if it is large (CPU)."""
    if like.device.type == "cpu" and prod(shape) * like.element_size() >= (
        RELEASE_HEAP_BYTES
    ):
        release_free_heap()
    return like.new_zeros(shape)
