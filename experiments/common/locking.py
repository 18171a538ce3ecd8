"""One writer per results folder: an exclusive lock held for the life of the process.

The first write into a results folder (or :func:`claim_folder` at the start of a
study) takes an exclusive :func:`fcntl.flock` lock on ``<folder>/.lock`` and records
the process id, host and start time in that file. A second process that wants to
write into the same folder is refused at once with :class:`FolderLockedError`, whose
message names the lock file and the process holding it. The operating system drops
the lock when the holder ends, even when it is killed with ``SIGKILL``, so a lock
is never stale on a local disk: a lock file whose process id no longer runs is simply
taken over. Folders that cannot be written (read-only) are used read-only: reading
complete results works, and only a write that is really needed fails.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

from experiments.common.files import (
    is_read_only_error,
    not_writable,
    remove_stale_temporaries,
)

LOCK_NAME = ".lock"

#: Folders whose lock this process holds: resolved folder -> open lock descriptor.
_HELD: dict[Path, int] = {}


class FolderLockedError(RuntimeError):
    """Another live process is writing into the results folder."""


def claim_folder(folder: Path) -> bool:
    """Take the write lock of ``folder`` (created if missing) for this process.

    Re-entrant: claiming a folder this process (or a folder above it) already holds
    does nothing.

    Args:
        folder: The results folder.

    Returns:
        ``True`` if this process may write into ``folder``; ``False`` if the folder
        is read-only (results can be read, not written).

    Raises:
        FolderLockedError: If another running process holds the lock; the message
            names it, the lock file and what to do.

    """
    folder = Path(folder).resolve()
    if _held_above(folder) is not None:
        return True
    _refuse_if_held_above(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"Results folder {folder} is a file, not a folder; pass another --out."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if is_read_only_error(err):
            return False
        raise
    if not _try_flock(descriptor):
        holder = _read_holder(descriptor)
        os.close(descriptor)
        raise FolderLockedError(_locked_message(folder, holder))
    _write_holder(descriptor)
    _HELD[folder] = descriptor
    remove_stale_temporaries(folder)
    return True


def ensure_writer(path: Path) -> None:
    """Make sure this process holds the lock of the folder ``path`` is written into.

    Uses a lock already held on a folder above ``path``; otherwise claims
    ``path``'s own folder.

    Raises:
        FolderLockedError: If another process writes into that folder.
        ResultsNotWritableError: If the folder is read-only.

    """
    folder = Path(path).resolve().parent
    if _held_above(folder) is None and not claim_folder(folder):
        raise not_writable(Path(path))


def release_folder(folder: Path) -> None:
    """Release this process's lock on ``folder`` (no-op if not held)."""
    descriptor = _HELD.pop(Path(folder).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)


def holds_lock(folder: Path) -> bool:
    """Whether this process holds the lock of ``folder`` or of a folder above it."""
    return _held_above(Path(folder).resolve()) is not None


def _held_above(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if candidate in _HELD:
            return candidate
    return None


def _refuse_if_held_above(folder: Path) -> None:
    """Refuse a folder inside one that another process is writing."""
    for parent in folder.parents:
        try:
            descriptor = os.open(parent / LOCK_NAME, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _try_flock(descriptor):
                raise FolderLockedError(
                    _locked_message(parent, _read_holder(descriptor))
                )
        finally:
            os.close(descriptor)


def _try_flock(descriptor: int) -> bool:
    """Try to lock; ``True`` also where the file system has no locks (warned)."""
    import fcntl

    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # e.g. ENOLCK on a network file system without locks
        warnings.warn(
            f"Results folders cannot be locked on this file system ({err}); make "
            "sure only one run writes into a folder at a time.",
            UserWarning,
            stacklevel=3,
        )
    return True


def _write_holder(descriptor: int) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)


def _read_holder(descriptor: int) -> dict:
    try:
        return json.loads(os.pread(descriptor, 4096, 0).decode())
    except (OSError, ValueError):
        return {}


def _locked_message(folder: Path, holder: dict) -> str:
    lock = folder / LOCK_NAME
    pid = holder.get("pid")
    who = (
        f"process {pid if pid is not None else '?'} on host "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')}, running "
        f"{holder.get('command', '?')!r}"
    )
    message = (
        f"Results folder {folder} is being written by another run ({who}; lock file "
        f"{lock}). Two runs writing one folder would mix their results: wait for that "
        "run to finish, or pass another --out. The lock is released automatically "
        "when that process ends (even if it is killed)"
    )
    if holder.get("host") == socket.gethostname() and not _alive(pid):
        return (
            f"{message}. Process {pid} has ended, but a process it started (e.g. a "
            "data-loader worker) still holds the lock: end that process."
        )
    return (
        f"{message}; if no such process runs any more (e.g. on a network file "
        f"system), delete {lock}."
    )


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _release_all() -> None:
    for folder in list(_HELD):
        release_folder(folder)
