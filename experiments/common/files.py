"""Safe result files: atomic writes under unique temporary names, and their errors.

Every file the study runner writes goes through :func:`atomic_write`: the content is
written to a temporary file whose name is unique to the writing process
(``.<name>.<pid>.<random>.tmp`` beside the target), flushed to disk and then renamed
over the target with :func:`os.replace`, so a reader sees either the old or the new
file, never a half-written one, and two processes never share a temporary file.
Content identical to the file on disk is not written again, so re-running a complete
study in a read-only folder writes nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

#: Names of temporary files left by a writer that was killed mid-write.
TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")

_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class CorruptFileError(ValueError):
    """A result file (checkpoint, table) exists but is damaged or not ours."""


class ResultsNotWritableError(PermissionError):
    """A result must be written but its folder is read-only."""


def is_read_only_error(err: OSError) -> bool:
    """Whether ``err`` says the file system refused a write (permissions, read-only)."""
    return isinstance(err, PermissionError) or err.errno in _READ_ONLY_ERRNOS


def temporary_name(path: Path) -> Path:
    """A temporary file name beside ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a unique temporary file.

    Args:
        path: Target file; its folder is created.
        write: Writes the complete content to the path it is given.

    Raises:
        ResultsNotWritableError: If the folder cannot be written (read-only);
            the message names the file and the fix.

    """
    from experiments.common.locking import ensure_writer

    path = Path(path)
    ensure_writer(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"Cannot write {path}: a folder of that name is in the way; delete it."
        )
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if is_read_only_error(err):
            raise not_writable(path, err) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless the file already holds it.

    Returns:
        Whether the file was written (``False``: its content was already ``data``).

    """
    path = Path(path)
    if read_bytes_or_none(path) == data:
        return False
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return True


def read_bytes_or_none(path: Path) -> bytes | None:
    """The content of ``path``, or ``None`` if it is not a readable file."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def sha256(data: bytes) -> str:
    """Hex SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def not_writable(path: Path, err: OSError | None = None) -> ResultsNotWritableError:
    """The error for a result that must be written into a read-only folder."""
    reason = f" ({type(err).__name__}: {err})" if err is not None else ""
    return ResultsNotWritableError(
        f"Cannot write {path}: its folder is read-only{reason}. This result is "
        "missing, damaged or was computed with other options, so it must be "
        "(re)computed; make the results folder writable or pass another --out."
    )


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files left in ``folder`` (recursively) by other processes.

    Only call this while holding the folder's lock (no other writer is active).

    Returns:
        The number of files removed.

    """
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):
        match = TEMPORARY.match(path.name)
        if match and int(match.group(1)) != os.getpid():
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed
