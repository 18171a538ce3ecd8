"""Result files: one checked CSV per configuration, reused when valid; the environment.

A study computes one :class:`pandas.DataFrame` per configuration and stores it under
``<out>/tables/<key>.csv`` with a completeness record ``<key>.json`` (see
:mod:`experiments.common.tables`); a re-run finds a valid table and skips the
computation, so an interrupted study resumes where it stopped, and recomputes (with a
warning) a table that is damaged or was computed for other options. The key holds the
configuration in readable form and, when given, a digest of the options that change
the table's numbers (``..._opt-<digest>.csv``). The environment (versions, device,
git commit, command line) is written to ``<out>/environment.json`` when it changed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from experiments.common.files import (
    CorruptFileError,
    ResultsNotWritableError,
    atomic_write_bytes,
    not_writable,
    read_bytes_or_none,
)
from experiments.common.locking import claim_folder
from experiments.common.tables import (
    parse_table,
    read_checked_table,
    read_table,
    table_bytes,
    write_checked_table,
    write_table,
)

__all__ = [
    "NON_NUMERIC_OPTIONS",
    "cached_table",
    "combine",
    "config_key",
    "environment",
    "number_options",
    "read_table",
    "recorded_options",
    "table_path",
    "write_environment",
    "write_table",
]

#: Command-line options that never change a number of a result (never in keys).
NON_NUMERIC_OPTIONS = frozenset(
    {"out", "data_dir", "threads", "no_progress", "no_plot", "progress"}
)

#: Longest readable part of a table's file name; longer keys end in a digest.
MAX_NAME = 180

#: Arguments given to :func:`write_environment`, by resolved results folder.
_ARGUMENTS: dict[Path, dict[str, object]] = {}


def config_key(config: Mapping[str, object]) -> str:
    """Build a file-name-safe key ``a=1_b=x`` for a configuration (in order)."""
    parts = [f"{name}={value}" for name, value in config.items()]
    key = "_".join(parts)
    return "".join(ch if ch.isalnum() or ch in "=._-" else "-" for ch in key)


def number_options(
    arguments: Mapping[str, object], exclude: Iterable[str] = ()
) -> dict[str, object]:
    """The options among ``arguments`` that may change a result's numbers.

    Args:
        arguments: Option name -> value, e.g. ``vars(args)``.
        exclude: Further names to leave out, e.g. those already in the key.

    Returns:
        The options (sorted by name, JSON-compatible values) without
        :data:`NON_NUMERIC_OPTIONS` and ``exclude``.

    """
    skip = NON_NUMERIC_OPTIONS | set(exclude)
    names = [name for name in sorted(arguments) if name not in skip]
    return {name: _jsonable(arguments[name]) for name in names}


def recorded_options(out_dir: Path, exclude: Iterable[str] = ()) -> dict[str, object]:
    """:func:`number_options` of the arguments this process recorded for ``out_dir``.

    Empty if :func:`write_environment` was not called for ``out_dir`` with arguments.
    """
    return number_options(_ARGUMENTS.get(Path(out_dir).resolve(), {}), exclude)


def table_path(
    out_dir: Path,
    config: Mapping[str, object],
    options: Mapping[str, object] | None = None,
) -> Path:
    """Where :func:`cached_table` stores the table of ``config`` and ``options``."""
    name = config_key(config)
    if len(name) > MAX_NAME:  # file systems allow 255 bytes per name
        digest = _digest({k: _jsonable(v) for k, v in config.items()})
        name = f"{name[: MAX_NAME - 17]}_key-{digest}"
    if options:
        name += "_opt-" + _digest(_jsonable(dict(options)))
    return Path(out_dir) / "tables" / f"{name}.csv"


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_table(
    out_dir: Path,
    config: Mapping[str, object],
    compute: Callable[[], pd.DataFrame],
    options: Mapping[str, object] | None = None,
) -> pd.DataFrame:
    """Return the table of ``config``, computing and storing it only if needed.

    A stored table is used only if its completeness record matches (see
    :mod:`experiments.common.tables`); a damaged one is recomputed with a warning.

    Args:
        out_dir: The study's output folder; tables go to ``out_dir / 'tables'``.
        config: The configuration; its items are prepended as columns and name the
            file.
        compute: Computes the table of this configuration.
        options: Further options that change the table's numbers but are not
            columns (e.g. ``--eval-batch-size``); a digest of them is part of the file
            name and they are compared on read. Default: none.

    Returns:
        The table, parsed from its CSV bytes so that fresh and cached results are
        identical.

    Raises:
        ResultsNotWritableError: If the table must be computed but ``out_dir`` is
            read-only.
        FolderLockedError: If it must be computed while another process writes
            into ``out_dir``.

    """
    path = table_path(out_dir, config, options)
    key = {"config": dict(config), "options": dict(options or {})}
    try:
        table = read_checked_table(path, key)
    except CorruptFileError as err:
        warnings.warn(f"{err} Recomputing it.", UserWarning, stacklevel=2)
        table = None
    if table is not None:
        return table
    if not claim_folder(out_dir):
        raise not_writable(path)
    frame = compute()
    for position, (name, value) in enumerate(config.items()):
        frame.insert(position, name, value)
    return write_checked_table(frame, path, key)


def combine(frames: list[pd.DataFrame], path: Path) -> pd.DataFrame:
    """Concatenate per-configuration tables and write the study's summary CSV.

    The file is only written if its content changes.

    Returns:
        The summary as parsed from its CSV bytes.

    """
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    data = table_bytes(frame)
    atomic_write_bytes(Path(path), data)
    return parse_table(data)


def environment() -> dict[str, object]:
    """Versions, platform, device and git commit of this run."""
    import numpy
    import torch

    try:
        import backpack

        backpack_version = getattr(backpack, "__version__", "unknown")
    except ImportError:  # pragma: no cover - backpack is a hard dependency
        backpack_version = None
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "backpack": backpack_version,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
    }


def write_environment(out_dir: Path, extra: Mapping[str, object] | None = None) -> Path:
    """Record :func:`environment` (plus ``extra``, e.g. the arguments) as JSON.

    Claims the folder for this process first (a second run writing the same folder
    is refused, see :mod:`experiments.common.locking`). The file is only rewritten
    if something besides the time changed, so re-running a complete study in a
    read-only folder works; if it changed but the folder is read-only, a warning
    says so (results that must be computed then fail clearly).

    Args:
        out_dir: The results folder.
        extra: The run's arguments, stored under ``'arguments'``; they are also
            remembered for :func:`recorded_options`.

    Returns:
        The path of ``environment.json``.

    Raises:
        FolderLockedError: If another running process writes into ``out_dir``.

    """
    out_dir = Path(out_dir)
    record = environment()
    if extra:
        record["arguments"] = {key: _jsonable(val) for key, val in extra.items()}
        _ARGUMENTS[out_dir.resolve()] = dict(extra)
    path = out_dir / "environment.json"
    claim_folder(out_dir)
    if _same_environment(read_bytes_or_none(path), record):
        return path
    try:
        atomic_write_bytes(path, json.dumps(record, indent=2).encode())
    except ResultsNotWritableError:
        warnings.warn(
            f"{path} was not updated because the folder is read-only: it describes "
            "the run that wrote this folder, not this one's arguments.",
            UserWarning,
            stacklevel=2,
        )
    return path


def _same_environment(old: bytes | None, new: Mapping[str, object]) -> bool:
    try:
        record = json.loads(old) if old is not None else None
    except ValueError:
        return False
    if not isinstance(record, dict):
        return False
    ignore = {"time"}
    new = json.loads(json.dumps(new, default=str))
    return {k: v for k, v in record.items() if k not in ignore} == {
        k: v for k, v in new.items() if k not in ignore
    }


def _jsonable(value: object) -> object:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()
