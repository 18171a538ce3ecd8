"""Checks shared by the tests of studies that cache checked tables.

Every study that reuses stored results must recompute a damaged table (never use it)
and compute a new result when an option that changes its numbers changes.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from experiments.common.tables import record_path


def checked_tables(folder: Path) -> list[Path]:
    """The checked tables (CSV files with a completeness record) below ``folder``."""
    return sorted(p for p in Path(folder).rglob("*.csv") if record_path(p).exists())


def cut_mid_line(path: Path) -> None:
    """Truncate ``path`` in the middle of its last line (a run killed mid-write)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 4])


def assert_truncated_table_is_recomputed(
    run: Callable[[], object],
    folder: Path,
    path: Path | None = None,
    deterministic: bool = True,
) -> None:
    """Truncate a checked table in ``folder``, ``run()`` again: it must be recomputed.

    Args:
        run: Runs the study again on the same folder.
        folder: Where the study's checked tables are.
        path: The table to damage. Default: the first one found.
        deterministic: Whether the recomputed table must equal the original byte
            for byte (``False`` for tables holding wall-clock times: then only its
            columns and number of rows must). Default: ``True``.

    """
    path = path or checked_tables(folder)[0]
    intact = path.read_bytes()
    cut_mid_line(path)
    with pytest.warns(UserWarning, match=f"{path.stem}.*Recomputing it"):
        run()
    if deterministic:
        assert path.read_bytes() == intact
    else:
        lines, again = intact.splitlines(), path.read_bytes().splitlines()
        assert len(again) == len(lines) and again[0] == lines[0]


_HOLDER = """
import sys
from experiments.common.locking import claim_folder
claim_folder(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """Hold the write lock of ``folder`` in another process for the ``with`` block.

    Yields the holding process; it is killed (and its lock released) at the end.
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def assert_second_run_is_refused(run: Callable[[], object], folder: Path) -> None:
    """``run()`` must be refused, writing nothing, while another process writes.

    A lock this process holds on ``folder`` (from an earlier run) is released first.
    """
    from experiments.common.locking import FolderLockedError, release_folder

    release_folder(folder)
    with held_by_another_process(folder):
        before = sorted(Path(folder).rglob("*"))
        with pytest.raises(FolderLockedError, match="being written by another run"):
            run()
        assert sorted(Path(folder).rglob("*")) == before


def assert_curves_keyed_by_sgd_lr(main: Callable[[list[str]], object], argv, folder):
    """A training-curve study: damaged table recomputed, a new ``--sgd-lr`` is new.

    ``argv`` runs SGD only and writes ``curves.csv`` into ``folder``.
    """
    import numpy as np
    import pandas as pd

    main(argv)
    (table,) = checked_tables(folder / "tables")
    assert_truncated_table_is_recomputed(
        lambda: main(argv), folder, table, deterministic=False
    )
    first = pd.read_csv(folder / "curves.csv")
    main([*argv, "--sgd-lr", "0.05"])
    changed = pd.read_csv(folder / "curves.csv")
    assert len(checked_tables(folder / "tables")) == 2
    assert not np.allclose(changed["train_loss"][1:], first["train_loss"][1:])
    assert changed["train_loss"][0] == first["train_loss"][0]
