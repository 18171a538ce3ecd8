"""The one training loop: numbers against a plain loop, callback order, curves, divergence."""

import math

import pytest
import torch

from experiments.common.callbacks import Curve, evaluate, every
from experiments.common.optimizers import OPTIMIZERS, bootstrap_grid, make_optimizer
from experiments.common.training import (
    Callback,
    LoopState,
    batch_indices,
    train_loop,
    train_step,
)
from experiments.problems import get_problem, make_seeded
from experiments.problems.data import load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _state(digits, lr=0.1):
    problem = get_problem("digits_logreg")
    model, loss_fn = make_seeded(problem, digits.input_shape, 10, extended=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return LoopState(model, loss_fn, optimizer, digits)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def at_step(self, state, done):
        self.calls.append(("at", state.step, done))

    def after_step(self, state):
        self.calls.append(("after", state.last.step, state.last.loss))


def test_loop_takes_the_steps_of_a_plain_loop(digits):
    recorder = Recorder()
    state = train_loop(
        _state(digits),
        batch_size=32,
        seed=3,
        until=lambda s: s.step >= 7,
        callbacks=[recorder],
    )
    ref = _state(digits)
    losses = []
    for step in range(7):
        idx = batch_indices(len(digits.train_y), 32, step, seed=3)
        ref.optimizer.zero_grad()
        loss = ref.loss_fn(ref.model(digits.train_x[idx]), digits.train_y[idx])
        loss.backward()
        ref.optimizer.step()
        losses.append(loss.item())
    for mine, theirs in zip(state.model.parameters(), ref.model.parameters()):
        assert torch.equal(mine, theirs)
    assert state.step == 7 and state.last.step == 6 and state.elapsed > 0
    assert [c[2] for c in recorder.calls if c[0] == "after"] == losses
    expected = []
    for step in range(7):
        expected += [("at", step, False), ("after", step)]
    expected.append(("at", 7, True))
    assert [c[:2] if c[0] == "after" else c for c in recorder.calls] == expected


def test_curve_rows_and_step_means(digits):
    recorder, curve = Recorder(), Curve(every(2))
    initial = evaluate(_state(digits).model, _state(digits).loss_fn, digits)
    train_loop(
        _state(digits),
        batch_size=32,
        seed=0,
        until=lambda s: s.step >= 5,
        callbacks=[curve, recorder],
    )
    frame = curve.frame()
    assert list(frame["step"]) == [0, 2, 4, 5]
    assert frame.iloc[0][list(initial)].to_dict() == initial
    losses = [c[2] for c in recorder.calls if c[0] == "after"]
    assert frame["batch_loss"].iloc[1] == sum(losses[:2]) / 2
    assert frame["batch_loss"].iloc[3] == losses[4]
    assert math.isnan(frame["batch_loss"].iloc[0])
    assert not frame["diverged"].any()


def test_divergence_stops_with_a_flagged_row(digits):
    curve = Curve(every(10))
    state = train_loop(
        _state(digits, lr=1e4),
        batch_size=32,
        seed=0,
        until=lambda s: s.step >= 50,
        callbacks=[curve],
    )
    frame = curve.frame()
    assert state.diverged and state.step < 50
    assert frame["diverged"].iloc[-1] and not frame["diverged"].iloc[:-1].any()
    assert frame["step"].iloc[-1] == state.step


def test_refused_errors_record_nan_and_others_propagate(digits):
    def failing(model, loss_fn, optimizer, inputs, labels):
        raise ValueError("non-finite")

    curve = Curve(every(10))
    state = _state(digits)
    before = [p.detach().clone() for p in state.model.parameters()]
    train_loop(
        state,
        batch_size=32,
        seed=0,
        until=lambda s: s.step >= 5,
        callbacks=[curve],
        step_fn=failing,
        refused=(ValueError,),
    )
    assert state.step == 1 and math.isnan(state.last.loss) and state.diverged
    assert list(curve.frame()["step"]) == [0, 1]
    with pytest.raises(ValueError, match="non-finite"):
        train_loop(
            _state(digits), batch_size=32, seed=0, until=lambda s: False,
            step_fn=failing,
        )  # fmt: skip
    for param, old in zip(state.model.parameters(), before):
        assert torch.equal(param, old)


def test_train_step_returns_loss_and_outputs_before_the_update(digits):
    state = _state(digits)
    inputs, labels = digits.train_x[:16], digits.train_y[:16]
    with torch.no_grad():
        expected = state.model(inputs)
    loss, output = train_step(
        state.model, state.loss_fn, state.optimizer, inputs, labels
    )
    assert torch.equal(output.detach(), expected)
    assert loss.item() == state.loss_fn(expected, labels).item()


def test_optimizers_by_name():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"optimizer must be one of .*'lbfgs'"):
        make_optimizer("lbfgs", params, lr=0.1)
    assert isinstance(make_optimizer("sgd", params, lr=0.1), torch.optim.SGD)
    assert "newton_bootstrap_floor" in OPTIMIZERS
    grid = bootstrap_grid(1e-4)
    assert len(grid) == 61 and grid[0] == pytest.approx(1e-4)
    assert grid[-1] == pytest.approx(100.0)
