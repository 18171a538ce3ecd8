"""One benchmark run: an optimiser trains a problem for a number of steps.

Mini-batches are a pure function of seed and step
(:func:`experiments.common.training.batch_indices`), so every optimiser sees the
same batches. The timed part of a step is forward, backward (inside BackPACK for
Newton, with ``create_graph`` for the Hutchinson peers) and ``step()`` (including a
closure's second evaluation); evaluations on the full training and test sets are
not timed. A run diverges (and stops) when a loss is not finite or the training
loss exceeds :data:`DIVERGED` times its initial value.
"""

from __future__ import annotations

import math
import time
import warnings

import pandas as pd
import torch
from backpack import backpack
from torch import nn

from experiments.common.data import ImageData
from experiments.common.training import batch_indices
from experiments.optimizer_benchmark.optimizers import Spec
from experiments.problems import Problem, make_extended

#: Training loss above this multiple of the initial loss counts as divergence.
DIVERGED = 5.0


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
    rows, elapsed, diverged = [], 0.0, False
    start_loss = math.nan
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps or diverged:
            row = {"step": step, "time_s": elapsed, **evaluate(model, loss_fn, data)}
            if step == 0:
                start_loss = row["train_loss"]
            bad = not math.isfinite(row["train_loss"])
            diverged = diverged or bad or row["train_loss"] > DIVERGED * start_loss
            row["diverged"] = diverged
            rows.append(row)
        if step == steps or diverged:
            break
        idx = batch_indices(len(data.train_y), batch_size, step, seed)
        begin = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = one_step(spec, model, loss_fn, opt, data.train_x[idx],
                                data.train_y[idx])  # fmt: skip
        except (ValueError, RuntimeError) as err:  # non-finite values refused
            if (
                "NaN" not in str(err)
                and "Inf" not in str(err)
                and "finite" not in str(err)
            ):
                raise
            loss = math.nan
        elapsed += time.perf_counter() - begin
        diverged = not math.isfinite(loss)
    return pd.DataFrame(rows)
