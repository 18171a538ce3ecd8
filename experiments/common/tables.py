"""CSV tables on disk: atomic writes, and checked tables that prove they are complete.

A *checked* table ``<name>.csv`` comes with a record ``<name>.json`` written after it:
what the table was computed for (its configuration and the options that change its
numbers), the SHA-256 digest of the CSV bytes, its columns, its number of rows and the
number of empty (NaN) cells per column. :func:`read_checked_table` accepts the table
only if all of these agree, so a table cut mid-line, edited, copied from a run with
other options or written by a run killed before its record is never used.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from experiments.common.files import (
    CorruptFileError,
    atomic_write_bytes,
    read_bytes_or_none,
    sha256,
)

FORMAT = 1


def table_bytes(frame: pd.DataFrame) -> bytes:
    """The CSV bytes of ``frame`` as :func:`write_table` stores them (no index)."""
    return frame.to_csv(index=False).encode()


def parse_table(data: bytes) -> pd.DataFrame:
    """Parse CSV bytes like :func:`read_table` (floats round-trip exactly)."""
    if not data.strip():
        return pd.DataFrame()
    return pd.read_csv(io.BytesIO(data))


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically under a unique temporary name; skip unchanged content."""
    atomic_write_bytes(Path(path), table_bytes(frame))


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV written by :func:`write_table`, floats round-tripping exactly."""
    return parse_table(Path(path).read_bytes())


def record_path(path: Path) -> Path:
    """Where the completeness record of the checked table ``path`` is stored."""
    return Path(path).with_suffix(".json")


def write_checked_table(
    frame: pd.DataFrame, path: Path, key: Mapping[str, object]
) -> pd.DataFrame:
    """Write ``frame`` to ``path`` and then its completeness record.

    Args:
        frame: The table.
        path: The CSV file.
        key: JSON-serialisable description of what the table was computed for;
            :func:`read_checked_table` accepts the table only for an equal ``key``.

    Returns:
        The table as read back from its CSV bytes (what a later read returns).

    """
    data = table_bytes(frame)
    parsed = parse_table(data)
    record = {"format": FORMAT, "key": _normalised(key), **_summary(parsed, data)}
    atomic_write_bytes(Path(path), data)
    atomic_write_bytes(record_path(path), json.dumps(record, indent=1).encode())
    return parsed


def read_checked_table(path: Path, key: Mapping[str, object]) -> pd.DataFrame | None:
    """Read a table written by :func:`write_checked_table` and verify it.

    Args:
        path: The CSV file.
        key: What the table must have been computed for.

    Returns:
        The table, or ``None`` if neither the table nor its record exists.

    Raises:
        CorruptFileError: If the table or its record is damaged, incomplete or was
            computed for another key; the message names the file and the reason.

    """
    path = Path(path)
    data, raw = read_bytes_or_none(path), read_bytes_or_none(record_path(path))
    if data is None and raw is None:
        return None
    if data is None:
        raise CorruptFileError(f"Table {path} is missing but its record exists.")
    if raw is None:
        raise CorruptFileError(
            f"Table {path} has no completeness record {record_path(path)} (written by "
            "an older version or by a run killed while writing it)."
        )
    try:
        record = json.loads(raw)
    except ValueError as err:
        raise CorruptFileError(
            f"Record {record_path(path)} is damaged ({err})."
        ) from err
    if not isinstance(record, dict):
        raise CorruptFileError(f"Record {record_path(path)} is not a JSON object.")
    if record.get("key") != _normalised(key):
        raise CorruptFileError(
            f"Table {path} was computed for {_short(record.get('key'), 400)}, not for "
            f"{_short(_normalised(key), 400)}."
        )
    try:
        parsed = parse_table(data)
    except (ValueError, pd.errors.ParserError) as err:
        raise CorruptFileError(f"Table {path} cannot be parsed ({err}).") from err
    summary = _summary(parsed, data)
    for field, value in summary.items():
        if record.get(field) != value:
            raise CorruptFileError(
                f"Table {path} is damaged: its {field} is {_short(value)}, its record "
                f"says {_short(record.get(field))}."
            )
    return parsed


def _summary(parsed: pd.DataFrame, data: bytes) -> dict[str, object]:
    return {
        "rows": len(parsed),
        "columns": [str(name) for name in parsed.columns],
        "nan_cells": {str(n): int(parsed[n].isna().sum()) for n in parsed.columns},
        "sha256": sha256(data),
    }


def _normalised(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
