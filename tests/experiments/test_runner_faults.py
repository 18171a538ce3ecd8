"""Fault injection into the study runner: crafted, truncated and foreign checkpoints,
damaged tables, and runs killed with SIGKILL at random moments.

Every case must end in the uninterrupted run's numbers or in a clear error that names
the file and the fix; nothing stored in a file is ever executed.
"""

import json
import os
import pickle
import random
import subprocess
import sys

import pandas as pd
import pytest
import torch

from experiments.common.checkpoints import (
    checkpoint_path,
    read_checkpoint,
    save_checkpoint,
)
from experiments.common.files import CorruptFileError
from experiments.common.results import cached_table, table_path
from experiments.common.resumable import TrainConfig
from experiments.common.study import Run, train_and_evaluate, train_run
from experiments.common.tables import record_path
from experiments.common.training import Callback
from experiments.problems import get_problem
from experiments.problems.data import load_digits

STEPS = [0, 4, 8]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _run(digits, out, num_steps=8, **kwargs):
    config = TrainConfig("sgd", lr=0.05, batch_size=32, num_steps=num_steps, **kwargs)
    return Run(get_problem("digits_logreg"), digits, config, out)


def _evaluate(model, loss_fn, step):
    x, y = load_digits().split("test")
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return pd.DataFrame(
        {"loss": [loss_fn(model(x), y).item()], "param_norm": [params.norm().item()]}
    )


def _table(run, steps=STEPS):
    return train_and_evaluate(run, steps, _evaluate, progress=False)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    return _table(_run(digits, tmp_path_factory.mktemp("reference")))


class _Planted:
    """Creates ``marker`` when unpickled: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch.save":
        torch.save({"model": _Planted(marker), "step": 4, "log": []}, path)
    else:
        path.write_bytes(pickle.dumps(_Planted(marker)))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_crafted_checkpoint_is_not_executed(digits, reference, tmp_path, kind):
    marker = tmp_path / "code-ran"
    run = _run(digits, tmp_path / "out")
    _table(run)
    crafted = checkpoint_path(run.checkpoint_dir, 8)
    _plant(crafted, marker, kind)
    for table in (tmp_path / "out" / "tables").glob("*step=8*"):
        table.unlink()  # the evaluation must load the final checkpoint again

    with pytest.raises(CorruptFileError, match=f"{crafted} is damaged.*could run code"):
        read_checkpoint(crafted)
    with pytest.warns(UserWarning, match="step0000008.pt is damaged"):
        table = _table(run)

    assert not marker.exists()
    pd.testing.assert_frame_equal(table, reference)
    assert crafted.with_name(crafted.name + ".damaged").exists()
    assert read_checkpoint(crafted)["step"] == 8


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_crafted_checkpoint_in_new_folder_is_overwritten(
    digits, reference, tmp_path, kind
):
    marker = tmp_path / "code-ran"
    run = _run(digits, tmp_path / "out")
    _plant(checkpoint_path(run.checkpoint_dir, 4), marker, kind)
    pd.testing.assert_frame_equal(_table(run), reference)
    assert not marker.exists()
    assert read_checkpoint(checkpoint_path(run.checkpoint_dir, 4))["step"] == 4


def test_checkpoints_round_trip_with_weights_only(digits, tmp_path):
    model = get_problem("digits_logreg").make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(digits.train_x[:8]).sum().backward()
    optimizer.step()
    path = tmp_path / "step0000001.pt"
    save_checkpoint(path, model, optimizer, 1, [{"step": 0, "loss": 1.5}])
    state = torch.load(path, weights_only=True)
    assert state["optimizer"]["state"][0]["exp_avg"].shape == model[1].weight.shape
    assert state["log"] == [{"step": 0, "loss": 1.5}]


@pytest.mark.parametrize("cut", [0.5, 10, 0])
def test_truncated_checkpoints_fall_back(digits, reference, tmp_path, cut):
    run = _run(digits, tmp_path)
    _table(run)
    for step in (4, 8):
        path = checkpoint_path(run.checkpoint_dir, step)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut) if cut < 1 else cut])
    for table in (tmp_path / "tables").glob("*step=8*"):
        table.unlink()  # the evaluation must load the recomputed checkpoint

    with pytest.warns(UserWarning, match="step0000004.pt is damaged"):
        table = _table(run)

    pd.testing.assert_frame_equal(table, reference)
    for step in STEPS:
        assert (
            read_checkpoint(checkpoint_path(run.checkpoint_dir, step))["step"] == step
        )


def test_checkpoint_that_is_a_folder_is_set_aside(digits, reference, tmp_path):
    run = _run(digits, tmp_path)
    checkpoint_path(run.checkpoint_dir, 4).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step0000008.pt").mkdir()  # outside: ignored
    with pytest.warns(UserWarning, match="step0000004.pt is damaged.*not a file"):
        pd.testing.assert_frame_equal(_table(run), reference)


def test_damaged_checkpoint_at_evaluation_names_file_and_fix(digits, tmp_path):
    run = _run(digits, tmp_path)
    _table(run)
    path = checkpoint_path(run.checkpoint_dir, 4)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=f"{path}.*Delete it and re-run"):
        run.load(4)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        run.load(4)


def test_checkpoint_of_other_hyperparameters_is_refused(digits, tmp_path):
    _table(_run(digits, tmp_path))
    other = _run(digits, tmp_path, momentum=0.5)
    with pytest.raises(ValueError, match="was written for .*momentum.*another --out"):
        _table(other)
    with pytest.raises(ValueError, match="step0000004.pt was written for"):
        other.load(4)


def test_checkpoint_of_other_model_is_refused(digits, tmp_path):
    run = _run(digits, tmp_path)
    mlp = Run(get_problem("digits_mlp"), digits, run.train_config, tmp_path)
    other, _ = mlp.fresh_model()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    save_checkpoint(checkpoint_path(run.checkpoint_dir, 0), other, optimizer, 0, [])
    with pytest.raises(ValueError, match="step0000000.pt does not fit this model"):
        _table(run)


def test_steps_outside_the_run_are_refused(digits, tmp_path):
    with pytest.raises(ValueError, match=r"steps \[9\] lie outside the run's 0..8"):
        _table(_run(digits, tmp_path), [0, 9])
    assert not (tmp_path / "checkpoints").exists()


def test_more_steps_continue_and_fewer_steps_train_nothing(digits, tmp_path):
    _table(_run(digits, tmp_path / "out", num_steps=8), [0, 4, 8])
    longer = _table(_run(digits, tmp_path / "out", num_steps=16), [0, 2, 12, 16])
    fresh = _table(_run(digits, tmp_path / "fresh", num_steps=16), [0, 2, 12, 16])
    pd.testing.assert_frame_equal(longer, fresh)

    class Count(Callback):
        steps = 0

        def after_step(self, state):
            self.steps += 1

    counter, shorter_run = Count(), _run(digits, tmp_path / "out", num_steps=8)
    train_run(shorter_run, [0, 4, 8], progress=False, callbacks=[counter])
    assert counter.steps == 0
    shorter = _table(shorter_run, [0, 4, 8])
    assert list(shorter["step"]) == [0, 4, 8]
    log = next((tmp_path / "out" / "logs").glob("*.csv"))
    assert len(pd.read_csv(log)) == 8


def _cut_mid_line(path):
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 7])


def _empty_cell(path):
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[1].split(",")
    cells[-1] = "\n"
    path.write_text("".join([lines[0], ",".join(cells), *lines[2:]]))


def _change_digit(path):
    text = path.read_text()
    position = text.rindex("5")
    path.write_text(text[:position] + "6" + text[position + 1 :])


DAMAGES = {
    "cut mid-line": _cut_mid_line,
    "row dropped": lambda p: p.write_text("".join(p.read_text().splitlines(True)[:-1])),
    "empty cell": _empty_cell,
    "digit changed": _change_digit,
    "record deleted": lambda p: record_path(p).unlink(),
    "record damaged": lambda p: record_path(p).write_text('{"format": 1, "ke'),
    "table deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_table_is_recomputed(tmp_path, damage):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"value": [0.125, 1.5, 2.25, 3.5], "k": range(4)})

    first = cached_table(tmp_path, {"run": 1}, compute, {"batch": 5})
    path = table_path(tmp_path, {"run": 1}, {"batch": 5})
    DAMAGES[damage](path)

    with pytest.warns(UserWarning, match=f"{path.stem}.*Recomputing it"):
        again = cached_table(tmp_path, {"run": 1}, compute, {"batch": 5})

    assert len(calls) == 2
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(
        cached_table(tmp_path, {"run": 1}, compute, {"batch": 5}), first
    )
    assert len(calls) == 2


def test_table_copied_from_other_options_is_recomputed(tmp_path):
    cached_table(tmp_path, {"run": 1}, lambda: pd.DataFrame({"v": [1.0]}), {"b": 1})
    source = table_path(tmp_path, {"run": 1}, {"b": 1})
    target = table_path(tmp_path, {"run": 1}, {"b": 2})
    target.write_bytes(source.read_bytes())
    record_path(target).write_bytes(record_path(source).read_bytes())
    with pytest.warns(UserWarning, match="was computed for .*'b': 1"):
        table = cached_table(
            tmp_path, {"run": 1}, lambda: pd.DataFrame({"v": [2.0]}), {"b": 2}
        )
    assert table["v"].tolist() == [2.0]


@pytest.fixture(scope="module")
def fork_server():
    """A process that has imported the tiny study and forks runs of it on request."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.experiments.tiny_study"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    assert server.stdout.readline().strip() == "READY"

    def request(out, kill_after=None, count=1):
        line = {"out": str(out), "kill_after": kill_after, "count": count}
        server.stdin.write(json.dumps(line) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    yield request
    server.stdin.close()
    server.kill()
    server.wait(timeout=60)


@pytest.fixture(scope="module")
def tiny_reference(fork_server, tmp_path_factory):
    """Outputs and duration of one uninterrupted run of the tiny study."""
    out = tmp_path_factory.mktemp("tiny") / "reference"
    (done,) = fork_server(out)
    assert done["exit"] == 0, done["error"]
    return _outputs(out), done["seconds"]


def _outputs(out):
    log = next((out / "logs").glob("*.csv")).read_bytes()
    return (out / "tiny.csv").read_bytes(), log


def test_sigkill_at_random_moments_then_resume(fork_server, tiny_reference, tmp_path):
    reference, seconds = tiny_reference
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills, folder, scale = [], None, 1.0
    for attempt in range(10):
        if len(kills) >= 3 and any(kills):
            break
        if not any(kills):  # runs can outpace the reference: until one is
            folder = tmp_path / f"killed{attempt}"  # killed, start afresh, earlier
        (outcome,) = fork_server(folder, rng.uniform(0, seconds) * scale)
        assert outcome["error"] is None, outcome["error"]
        kills.append(outcome["killed"])
        scale = scale if any(kills) else scale / 2
    (resumed,) = fork_server(folder)
    assert resumed["exit"] == 0, f"seed {seed}: {resumed['error']}"
    assert any(kills), f"seed {seed}: no run was killed"
    assert _outputs(folder) == reference, seed
    assert not list(folder.rglob(".*.tmp"))


def test_two_concurrent_runs_on_one_folder(fork_server, tiny_reference, tmp_path):
    outcomes = fork_server(tmp_path / "shared", count=2)
    assert any(outcome["exit"] == 0 for outcome in outcomes)
    for outcome in outcomes:
        if outcome["exit"] != 0:
            assert "FolderLockedError" in outcome["error"]
            assert f"{tmp_path / 'shared' / '.lock'}" in outcome["error"]
    assert _outputs(tmp_path / "shared") == tiny_reference[0]
    assert not list((tmp_path / "shared").rglob("*.tmp"))
