"""Result files: one CSV per configuration, skipped when present, and the environment.

A study computes one :class:`pandas.DataFrame` per configuration and stores it under
``<out>/tables/<key>.csv``; a re-run finds the file and skips the computation, so an
interrupted study resumes where it stopped. The environment (versions, device, git
commit, command line) is written to ``<out>/environment.json``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd


def config_key(config: Mapping[str, object]) -> str:
    """Build a file-name-safe key ``a=1_b=x`` for a configuration (in order)."""
    parts = [f"{name}={value}" for name, value in config.items()]
    key = "_".join(parts)
    return "".join(ch if ch.isalnum() or ch in "=._-" else "-" for ch in key)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically (temporary file, then rename) so no half file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV written by :func:`write_table`, floats round-tripping exactly."""
    return pd.read_csv(path)


def cached_table(
    out_dir: Path, config: Mapping[str, object], compute: Callable[[], pd.DataFrame]
) -> pd.DataFrame:
    """Return the table of ``config``, computing and storing it only if absent.

    Args:
        out_dir: The study's output folder; tables go to ``out_dir / 'tables'``.
        config: The configuration; its items are prepended as columns.
        compute: Computes the table of this configuration.

    Returns:
        The table, read back from disk so that fresh and cached results are identical.

    """
    path = Path(out_dir) / "tables" / f"{config_key(config)}.csv"
    if not path.exists():
        frame = compute()
        for position, (name, value) in enumerate(config.items()):
            frame.insert(position, name, value)
        write_table(frame, path)
    return read_table(path)


def combine(frames: list[pd.DataFrame], path: Path) -> pd.DataFrame:
    """Concatenate per-configuration tables and write the study's summary CSV."""
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_table(frame, Path(path))
    return read_table(Path(path))


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
    """Write :func:`environment` (plus ``extra``, e.g. the arguments) to JSON."""
    record = environment()
    if extra:
        record["arguments"] = {key: _jsonable(val) for key, val in extra.items()}
    path = Path(out_dir) / "environment.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
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
