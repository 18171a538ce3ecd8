"""One training run on a classification problem with SGD, Adam or damped Newton.

Mini-batches come from :func:`experiments.common.training.batch_indices` (a pure
function of seed and step), so all optimizers see the same batches for a seed. Every
``eval_every`` steps the model is evaluated on the full training and test sets. The
reported wall time covers forward, backward (with BackPACK for damped Newton) and
``step()`` only, not the evaluations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from backpack import backpack
from torch import Tensor, nn

from experiments.common.data import ImageData
from experiments.common.training import batch_indices
from experiments.problems import Problem, make_extended
from vivitlib.optim import BootstrapDamping, ConstantDamping, DampedNewton

OPTIMIZERS = (
    "sgd",
    "adam",
    "newton_constant",
    "newton_bootstrap",
    "newton_bootstrap_floor",
    "newton_default",
)


#: A run counts as diverged (and stops) once a mini-batch loss exceeds this multiple
#: of the initial training loss or is not finite.
DIVERGED = 100.0


@dataclass(frozen=True)
class RunConfig:
    """Hyperparameters of one run.

    Attributes:
        optimizer: One of :data:`OPTIMIZERS`.
        lr: Learning rate.
        steps: Number of optimization steps.
        batch_size: Mini-batch size.
        seed: Seed of initialisation, batch order and randomness of the optimizer.
        eval_every: Evaluate every this many steps (and at the last step).
        damping: Damping of ``newton_constant``, and smallest bootstrap candidate of
            ``newton_bootstrap_floor``. Default: ``3.0``.
        bootstrap_min: Smallest candidate of ``newton_bootstrap``; candidates are
            log-spaced up to ``100`` with 10 per decade. Default: ``1e-4`` (the
            library's default grid).
        mc_samples: MC samples of the GGN for the Newton optimizers. Default: ``1``.
        momentum: Momentum of SGD. Default: ``0.9``.
    """

    optimizer: str
    lr: float
    steps: int
    batch_size: int
    seed: int
    eval_every: int
    damping: float = 3.0
    bootstrap_min: float = 1e-4
    mc_samples: int = 1
    momentum: float = 0.9

    def __post_init__(self) -> None:
        """Validate the optimizer name."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}.")


def bootstrap_grid(low: float, high: float = 100.0, per_decade: int = 10) -> Tensor:
    """Log-spaced bootstrap damping candidates from ``low`` to ``high``, both included.

    Args:
        low: Smallest candidate (> 0).
        high: Largest candidate. Default: ``100``.
        per_decade: Candidates per decade. Default: ``10``.

    Returns:
        The candidates ``[M]``, ascending.
    """
    decades = math.log10(high / low)
    num = max(round(per_decade * decades), 1) + 1
    return torch.logspace(math.log10(low), math.log10(high), num)


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Create the optimizer of ``config`` for ``model`` (Newton: extended model)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.optimizer == "newton_default":  # untuned, safeguards on
        return DampedNewton(
            model.parameters(), mc_samples=config.mc_samples, track_dampings=True
        )
    if config.optimizer == "newton_constant":
        damping = ConstantDamping(config.damping)
    else:
        low = config.bootstrap_min
        if config.optimizer == "newton_bootstrap_floor":
            low = config.damping
        grid = bootstrap_grid(low)
        damping = BootstrapDamping(candidates=grid, generator=config.seed)
    return DampedNewton(
        model.parameters(), damping, lr=config.lr, mc_samples=config.mc_samples,
        track_dampings=True, safeguards=False,
    )  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, data: ImageData) -> dict:
    """Loss and accuracy on the full training and test sets."""
    result = {}
    for split in ("train", "test"):
        inputs, labels = data.split(split)
        output = model(inputs)
        result[f"{split}_loss"] = loss_fn(output, labels).item()
        result[f"{split}_accuracy"] = (output.argmax(1) == labels).float().mean().item()
    return result


def train_step(model, loss_fn, optimizer, inputs, labels) -> float:
    """One step on ``(inputs, labels)``; return the mini-batch loss.

    Optimizers exposing BackPACK ``extensions`` and a ``hook`` (``DampedNewton``,
    ``LanczosDampedNewton``) get their backward pass inside ``with backpack(...)``.
    """
    optimizer.zero_grad()
    if hasattr(optimizer, "extensions") and hasattr(optimizer, "hook"):
        with backpack(*optimizer.extensions, extension_hook=optimizer.hook):
            loss = loss_fn(model(inputs), labels)
            loss.backward()
    else:
        loss = loss_fn(model(inputs), labels)
        loss.backward()
    optimizer.step()
    return loss.item()


def _newton_stats(optimizer: torch.optim.Optimizer, since: int) -> dict:
    """Mean number of directions and of directions stepped along since a record."""
    if not isinstance(optimizer, DampedNewton):
        return {"directions": math.nan, "stepped_directions": math.nan}
    records = optimizer.damping_history[since:]
    if not records:
        return {"directions": math.nan, "stepped_directions": math.nan}
    total = sum(r.dampings.numel() for r in records)
    stepped = sum(int(torch.isfinite(r.dampings).sum()) for r in records if r.applied)
    return {
        "directions": total / len(records),
        "stepped_directions": stepped / len(records),
    }


def train(problem: Problem, data: ImageData, config: RunConfig) -> pd.DataFrame:
    """Train one model and log evaluations.

    Args:
        problem: The problem (model factory and loss).
        data: Its data set.
        config: Hyperparameters.

    Returns:
        One row per evaluation with columns ``step, time_s, step_time_s,
        train_loss, train_accuracy, test_loss, test_accuracy, batch_loss,
        directions, stepped_directions, diverged``. ``time_s`` is the cumulative
        training time, ``step_time_s`` the mean time per step since the previous
        row, ``batch_loss`` the mean mini-batch loss since then; the direction
        counts are means per step (Newton only, else NaN). A diverged run (see
        :data:`DIVERGED`) ends with a row flagged ``diverged``.
    """
    if config.optimizer.startswith("newton"):
        model, loss_fn = make_extended(
            problem, data.input_shape, data.num_classes, config.seed
        )
    else:
        torch.manual_seed(config.seed)
        model = problem.make_model(data.input_shape, data.num_classes)
        loss_fn = problem.make_loss()
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(config, model)
    rows, elapsed, interval_time, losses, records = [], 0.0, 0.0, [], 0
    diverged = False
    for step in range(config.steps + 1):
        if step % config.eval_every == 0 or step == config.steps or diverged:
            row = {"step": step, "time_s": elapsed}
            row["step_time_s"] = interval_time / len(losses) if losses else math.nan
            row["batch_loss"] = sum(losses) / len(losses) if losses else math.nan
            row.update(evaluate(model, loss_fn, data))
            row.update(_newton_stats(optimizer, records))
            row["diverged"] = diverged
            rows.append(row)
            interval_time, losses = 0.0, []
            if isinstance(optimizer, DampedNewton):
                records = len(optimizer.damping_history)
        if step == config.steps or diverged:
            break
        idx = batch_indices(len(data.train_y), config.batch_size, step, config.seed)
        inputs, labels = data.train_x[idx], data.train_y[idx]
        start = time.perf_counter()
        try:
            loss = train_step(model, loss_fn, optimizer, inputs, labels)
        except ValueError:  # non-finite outputs are refused by the curvature pass
            loss = math.nan
        duration = time.perf_counter() - start
        interval_time += duration
        elapsed += duration
        losses.append(loss)
        diverged = not math.isfinite(loss) or loss > DIVERGED * rows[0]["train_loss"]
    return pd.DataFrame(rows)
