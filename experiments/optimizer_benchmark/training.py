"""One benchmark run: an optimiser trains a problem for a number of steps.

The loop is the studies' one, :func:`experiments.common.training.train_loop`:
mini-batches are a pure function of seed and step
(:func:`experiments.common.training.batch_indices`), so every optimiser sees the
same batches. The timed part of a step is forward, backward (inside BackPACK for
Newton, with ``create_graph`` for the Hutchinson peers) and ``step()`` (including a
closure's second evaluation); evaluations on the full training and test sets are
not timed (:class:`Evaluations`). A run diverges (and stops) when a loss is not
finite or the training loss exceeds :data:`DIVERGED` times its initial value.
"""

from __future__ import annotations

import math
import warnings

import pandas as pd
import torch
from backpack import backpack
from torch import nn

from experiments.common.training import Callback, LoopState, train_loop
from experiments.optimizer_benchmark.optimizers import Spec
from experiments.problems import Problem, make_extended
from experiments.problems.data import ImageData

#: Training loss above this multiple of the initial loss counts as divergence.
DIVERGED = 5.0


class _Refused(Exception):
    """The optimiser refused non-finite numbers: the step changed nothing."""


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, data: ImageData) -> dict:
    """Loss on the full training set, loss and accuracy on the test set."""
    out = {"train_loss": loss_fn(model(data.train_x), data.train_y).item()}
    logits = model(data.test_x)
    out["test_loss"] = loss_fn(logits, data.test_y).item()
    out["test_accuracy"] = (logits.argmax(1) == data.test_y).float().mean().item()
    return out


def one_step(spec: Spec, model, loss_fn, opt, inputs, labels) -> float:
    """Run one optimisation step; return the mini-batch loss before the step."""

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        return loss

    if spec.kind == "newton":
        if spec.closure:
            return float(opt.step(closure))
        opt.zero_grad()
        with backpack(*opt.extensions, extension_hook=opt.hook):
            loss = loss_fn(model(inputs), labels)
            loss.backward()
        opt.step()
        return loss.item()
    opt.zero_grad()
    loss = loss_fn(model(inputs), labels)
    loss.backward(create_graph=spec.kind == "hessian")
    opt.step()
    return loss.item()


def _step_fn(spec: Spec):
    """:func:`one_step` as a ``train_loop`` step; refusals become :class:`_Refused`."""

    def step(model, loss_fn, opt, inputs, labels):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return one_step(spec, model, loss_fn, opt, inputs, labels), None
        except (ValueError, RuntimeError) as err:  # non-finite values refused
            if not any(word in str(err) for word in ("NaN", "Inf", "finite")):
                raise
            raise _Refused from err

    return step


class Evaluations(Callback):
    """A row every ``eval_every`` steps and at the end; flags divergence.

    Rows: ``step, time_s, train_loss, test_loss, test_accuracy, diverged``
    (``time_s``: cumulative timed seconds). Divergence: a non-finite mini-batch
    loss, or a training loss that is not finite or above :data:`DIVERGED` times
    the first row's.
    """

    def __init__(self, eval_every: int) -> None:
        self.eval_every = eval_every
        self.rows: list[dict] = []

    def at_step(self, state: LoopState, done: bool) -> None:  # noqa: D102
        if not (done or state.step % self.eval_every == 0):
            return
        row = {"step": state.step, "time_s": state.elapsed}
        row.update(evaluate(state.model, state.loss_fn, state.data))
        start = self.rows[0]["train_loss"] if self.rows else row["train_loss"]
        bad = not math.isfinite(row["train_loss"])
        state.diverged = state.diverged or bad or row["train_loss"] > DIVERGED * start
        row["diverged"] = state.diverged
        self.rows.append(row)

    def after_step(self, state: LoopState) -> None:  # noqa: D102
        state.diverged = not math.isfinite(state.last.loss)


def train(
    problem: Problem,
    data: ImageData,
    spec: Spec,
    value: float,
    seed: int,
    steps: int,
    eval_every: int,
    batch_size: int,
) -> pd.DataFrame:
    """Train once; one row per evaluation.

    Returns:
        Columns ``step, time_s, train_loss, test_loss, test_accuracy, diverged``
        (``time_s``: cumulative timed seconds).
    """
    model, loss_fn = make_extended(problem, data.input_shape, data.num_classes, seed)
    torch.manual_seed(seed)
    opt = spec.make(list(model.parameters()), value, seed)
    evaluations = Evaluations(eval_every)
    train_loop(
        LoopState(model, loss_fn, opt, data),
        batch_size=batch_size,
        seed=seed,
        until=lambda state: state.step >= steps,
        callbacks=[evaluations],
        step_fn=_step_fn(spec),
        refused=(_Refused,),
    )
    return pd.DataFrame(evaluations.rows)
