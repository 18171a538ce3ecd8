"""Results folders: one writer at a time, results keyed by every option that changes a
number, longer runs continuing shorter ones, and complete read-only folders."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import experiments.common.locking as locking
from experiments.common.files import (
    ResultsNotWritableError,
    atomic_write,
    atomic_write_bytes,
    temporary_name,
)
from experiments.common.locking import FolderLockedError, claim_folder, release_folder
from experiments.common.results import (
    cached_table,
    number_options,
    table_path,
    write_environment,
)
from tests.experiments import tiny_study
from tests.experiments.study_checks import held_by_another_process

OPTIONS = {
    "--problem": "digits_logreg",
    "--optimizers": "sgd",
    "--epochs": "0.2",
    "--batch-size": "32",
    "--steps": "0,4,8",
    "--eval-batch-size": "64",
    "--threads": "1",
}


def _argv(out, **changes):
    options = {**OPTIONS, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
    argv = [item for pair in options.items() if pair[1] is not None for item in pair]
    return [*argv, "--no-progress", "--out", str(out)]


def _tiny(out, **changes):
    return pd.read_csv(tiny_study.main(_argv(out, **changes))["table"])


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_second_writer_is_refused_until_the_holder_dies(tmp_path):
    with held_by_another_process(tmp_path) as holder:
        lock = tmp_path / ".lock"
        expected = f"process {holder.pid} .*lock file {lock}.*another --out.*delete"
        with pytest.raises(FolderLockedError, match=expected):
            claim_folder(tmp_path)
        with pytest.raises(FolderLockedError, match=str(lock)):
            write_environment(tmp_path / "sub", {"a": 1})
        with pytest.raises(FolderLockedError):
            atomic_write_bytes(tmp_path / "table.csv", b"x\n")
        assert not (tmp_path / "table.csv").exists()
    assert claim_folder(tmp_path)  # the dead holder's lock is taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    release_folder(tmp_path)


_FORKING_HOLDER = """
import os, sys
from experiments.common.locking import claim_folder
claim_folder(sys.argv[1])
if os.fork() == 0:
    print(os.getpid(), flush=True)
    sys.stdin.read()
    os._exit(0)
os._exit(0)
"""


def test_lock_kept_by_a_child_of_a_dead_holder_is_explained(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _FORKING_HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(holder.stdout.readline())
    holder.wait()
    try:
        expected = f"Process {holder.pid} has ended, but a process it started"
        with pytest.raises(FolderLockedError, match=expected):
            claim_folder(tmp_path)
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdin.close()
    for _ in range(200):  # the child is not ours to reap; wait for its lock to go
        try:
            claim_folder(tmp_path)
            break
        except FolderLockedError:
            time.sleep(0.01)
    assert locking.holds_lock(tmp_path)
    release_folder(tmp_path)


def test_temporary_files_are_unique_and_never_left(tmp_path):
    target = tmp_path / "table.csv"
    assert temporary_name(target) != temporary_name(target)
    assert temporary_name(target).name.startswith(f".table.csv.{os.getpid()}.")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert not list(tmp_path.glob("*table*")) and not list(tmp_path.glob(".*.tmp"))
    stale = tmp_path / "sub" / ".x.csv.999999.0123abcd.tmp"
    stale.parent.mkdir()
    stale.write_text("left by a killed run")
    release_folder(tmp_path)
    claim_folder(tmp_path)
    assert not stale.exists()


def test_changed_option_gets_a_new_result(tmp_path):
    first = _tiny(tmp_path / "out")
    smaller = _tiny(tmp_path / "out", eval_batch_size="32")
    fresh = _tiny(tmp_path / "fresh", eval_batch_size="32")
    pd.testing.assert_frame_equal(smaller, fresh)
    assert not first["loss"].equals(smaller["loss"])
    arguments = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert arguments["arguments"]["eval_batch_size"] == 32

    tables = sorted((tmp_path / "out" / "tables").glob("*.csv"))
    stamps = {path: path.stat().st_mtime_ns for path in tables}
    pd.testing.assert_frame_equal(_tiny(tmp_path / "out"), first)
    assert {path: path.stat().st_mtime_ns for path in tables} == stamps
    assert len(tables) == 6


def test_number_options_leave_out_only_what_changes_no_number():
    arguments = {"out": "x", "threads": 2, "no_progress": True, "eval_batch_size": 3}
    assert number_options(arguments) == {"eval_batch_size": 3}
    assert number_options({"a": (1, 2), "b": 1}, exclude={"b"}) == {"a": [1, 2]}


def test_more_epochs_continue_from_the_shorter_run(tmp_path):
    _tiny(tmp_path / "out", epochs="0.5", steps=None)
    longer = _tiny(tmp_path / "out", epochs="1", steps=None)
    pd.testing.assert_frame_equal(
        longer, _tiny(tmp_path / "fresh", epochs="1", steps=None)
    )
    assert list(longer["step"]) == [0, 2, 44]


def test_environment_is_written_only_when_changed(tmp_path):
    path = write_environment(tmp_path, {"seed": 1})
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    record = json.loads(before[0])
    record["time"] = "2000-01-01T00:00:00+00:00"
    path.write_text(json.dumps(record, indent=2))
    stamp = path.stat().st_mtime_ns
    write_environment(tmp_path, {"seed": 1})
    assert path.stat().st_mtime_ns == stamp  # only the time differs: kept
    write_environment(tmp_path, {"seed": 2})
    assert json.loads(path.read_text())["arguments"] == {"seed": 2}
    assert before[1] <= path.stat().st_mtime_ns


def _snapshot(folder):
    return {
        path.relative_to(folder): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def read_only(monkeypatch):
    """Make every write through ``os`` fail as on a read-only file system."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    original_open = os.open

    def open_read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse()
        return original_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(locking.os, "open", open_read_only)
    for name in ("replace", "rename", "unlink", "mkdir"):
        monkeypatch.setattr(os, name, refuse)


def test_complete_read_only_folder_is_read(tmp_path, monkeypatch, request):
    out = tmp_path / "out"
    table = _tiny(out)
    release_folder(out)
    before = _snapshot(out)
    request.getfixturevalue("read_only")

    pd.testing.assert_frame_equal(_tiny(out), table)
    with (
        pytest.raises(ResultsNotWritableError, match="read-only.*another --out"),
        pytest.warns(UserWarning, match="environment.json was not updated"),
    ):
        _tiny(out, eval_batch_size="32")

    monkeypatch.undo()
    assert _snapshot(out) == before


def test_results_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder.*--out"):
        write_environment(tmp_path / "out", {"a": 1})


def test_folder_in_the_way_of_a_result_is_named(tmp_path):
    (tmp_path / "table.csv").mkdir()
    with pytest.raises(IsADirectoryError, match="table.csv: a folder of that name"):
        atomic_write_bytes(tmp_path / "table.csv", b"a\n1\n")


def test_long_and_colliding_keys_stay_apart(tmp_path):
    long = {f"option_{i}": "x" * 20 for i in range(20)}
    path = table_path(tmp_path, long, {"b": 1})
    assert len(path.name) < 255 and "_key-" in path.name
    assert table_path(tmp_path, {**long, "option_19": "y"}, {"b": 1}) != path
    first = cached_table(tmp_path, long, lambda: pd.DataFrame({"v": [1.0]}))
    assert first["v"].tolist() == [1.0]
    # 'x/y' and 'x-y' share a file name; the record tells them apart
    cached_table(tmp_path, {"a": "x/y"}, lambda: pd.DataFrame({"v": [1.0]}))
    with pytest.warns(UserWarning, match="was computed for"):
        other = cached_table(tmp_path, {"a": "x-y"}, lambda: pd.DataFrame({"v": [2.0]}))
    assert other["v"].tolist() == [2.0]
