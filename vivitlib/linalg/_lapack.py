"""LAPACK ``?syevd`` in place, the routine ``torch.linalg.eigh`` calls on CPU.

Found in torch's own library and called with the prototype torch uses (32-bit
integers, characters by reference), so the numbers are torch's; used where
``torch.linalg`` would copy the ``M × M`` input first (see
:func:`vivitlib.linalg.gram_eigh`). Not a public torch interface: where the
routine is missing (another build), on other devices and for inputs autograd
tracks, :func:`syevd_applies` is ``False`` and callers use ``torch.linalg``.
Setting the environment variable ``VIVITLIB_INPLACE_EIGH=0`` turns the path
off everywhere (for a torch build whose ``?syevd`` has another prototype).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path

import torch
from torch import Tensor

_SYEVD_NAMES = {torch.float64: "dsyevd_", torch.float32: "ssyevd_"}
#: Environment variable that turns the in-place path off when set to ``0``.
SWITCH = "VIVITLIB_INPLACE_EIGH"
#: Largest ``M`` for which ``?syevd``'s workspace ``1 + 6M + 2M²`` (with
#: eigenvectors) fits its 32-bit integer.
_SYEVD_MAX_SIZE = 32766


def syevd_applies(gram: Tensor, dtype: torch.dtype) -> bool:
    """Whether the in-place LAPACK path can decompose ``gram`` in ``dtype``.

    Not for a ``gram`` that autograd tracks (``torch.linalg.eigh`` is
    differentiable, a foreign call is not).
    """
    return (
        gram.device.type == "cpu"
        and os.environ.get(SWITCH, "1") != "0"
        and not (gram.requires_grad and torch.is_grad_enabled())
        and gram.dtype in _SYEVD_NAMES
        and 0 < gram.shape[0] <= _SYEVD_MAX_SIZE
        and syevd_routine(dtype) is not None
    )


@functools.cache
def syevd_routine(dtype: torch.dtype):
    """The CPU LAPACK ``?syevd`` torch links, as a ctypes function (or ``None``)."""
    name = _SYEVD_NAMES.get(dtype)
    if name is None:
        return None
    for path in sorted((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*")):
        try:
            routine = getattr(ctypes.CDLL(str(path)), name)
        except (OSError, AttributeError):
            continue
        int_p, ptr = ctypes.POINTER(ctypes.c_int), ctypes.c_void_p
        routine.restype = None
        routine.argtypes = [ctypes.c_char_p, ctypes.c_char_p, int_p, ptr, int_p]
        routine.argtypes += [ptr, ptr, int_p, ptr, int_p, int_p]
        return routine
    return None


def syevd_(matrix: Tensor, eigenvectors: bool) -> Tensor:
    """Eigenvalues (ascending) of the symmetric row-major ``matrix``, in place.

    LAPACK sees the transpose (column-major) and reads its lower triangle:
    ``matrix``'s upper one, the same memory ``torch.linalg.eigh(UPLO="L")``
    reads when ``matrix`` is symmetric. Without eigenvectors it overwrites the
    upper triangle and the diagonal only; with them, row ``j`` of ``matrix``
    becomes eigenvector ``j``.

    Raises:
        torch.linalg.LinAlgError: If LAPACK reports a failure to converge.
    """
    routine = syevd_routine(matrix.dtype)
    n = matrix.shape[0]
    size, info = ctypes.c_int(n), ctypes.c_int(0)
    jobz = b"V" if eigenvectors else b"N"
    evals = matrix.new_empty(n)

    def call(work: Tensor, lwork: int, iwork: Tensor, liwork: int) -> None:
        routine(
            jobz, b"L", size, matrix.data_ptr(), size, evals.data_ptr(),
            work.data_ptr(), ctypes.c_int(lwork), iwork.data_ptr(),
            ctypes.c_int(liwork), info,
        )  # fmt: skip

    work, iwork = matrix.new_empty(1), torch.empty(1, dtype=torch.int32)
    call(work, -1, iwork, -1)  # workspace query
    lwork, liwork = (
        (1 + 6 * n + 2 * n * n, 3 + 5 * n) if eigenvectors else (2 * n + 1, 1)
    )
    lwork = max(lwork, int(math.ceil(float(work[0]))))
    liwork = max(liwork, int(iwork[0]))
    work = matrix.new_empty(lwork)
    iwork = torch.empty(liwork, dtype=torch.int32)
    call(work, lwork, iwork, liwork)
    if info.value != 0:
        raise torch.linalg.LinAlgError(
            f"The eigen-decomposition of the Gram matrix failed to converge "
            f"(LAPACK ?syevd info={info.value}); check the inputs for extreme "
            "values, or use float64 (eigh_dtype=torch.float64)."
        )
    return evals
