"""One training run on a classification problem with SGD, Adam or damped Newton.

The run is :func:`experiments.common.training.train_loop` with an evaluation
:class:`~experiments.common.callbacks.Curve`: mini-batches are a pure function of
seed and step, so all optimizers see the same batches for a seed; every
``eval_every`` steps the model is evaluated on the full training and test sets. The
reported wall time covers forward, backward (with BackPACK for damped Newton) and
``step()`` only, not the evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from experiments.common.callbacks import Curve, every
from experiments.common.optimizers import OPTIMIZERS, make_optimizer
from experiments.common.training import LoopState, train_loop
from experiments.problems import ImageData, Problem, make_seeded
from vivitlib.optim import DampedNewton


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


class NewtonStats:
    """Curve column: mean directions (and stepped ones) per step since the last row.

    NaN for optimizers other than :class:`~vivitlib.optim.DampedNewton`.
    """

    def __init__(self) -> None:
        self.since = 0

    def __call__(self, state: LoopState) -> dict:
        """The columns ``directions`` and ``stepped_directions`` of a row."""
        optimizer = state.optimizer
        if not isinstance(optimizer, DampedNewton):
            return {"directions": math.nan, "stepped_directions": math.nan}
        records = optimizer.damping_history[self.since :]
        self.since = len(optimizer.damping_history)
        if not records:
            return {"directions": math.nan, "stepped_directions": math.nan}
        total = sum(r.dampings.numel() for r in records)
        stepped = sum(
            int(torch.isfinite(r.dampings).sum()) for r in records if r.applied
        )
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
        batch_loss, train_loss, train_accuracy, test_loss, test_accuracy,
        directions, stepped_directions, diverged``. ``time_s`` is the cumulative
        training time, ``step_time_s`` the mean time per step since the previous
        row, ``batch_loss`` the mean mini-batch loss since then; the direction
        counts are means per step (Newton only, else NaN). A diverged run (see
        :data:`experiments.common.callbacks.DIVERGED`) ends with a row flagged
        ``diverged``.
    """
    newton = config.optimizer.startswith("newton")
    model, loss_fn = make_seeded(
        problem, data.input_shape, data.num_classes, config.seed, extended=newton
    )
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), lr=config.lr,
        momentum=config.momentum, seed=config.seed, damping=config.damping,
        bootstrap_min=config.bootstrap_min, mc_samples=config.mc_samples,
    )  # fmt: skip
    curve = Curve(every(config.eval_every), extras=[NewtonStats()])
    train_loop(
        LoopState(model, loss_fn, optimizer, data),
        batch_size=config.batch_size,
        seed=config.seed,
        until=lambda state: state.step >= config.steps,
        callbacks=[curve],
        refused=(ValueError,),  # non-finite outputs are refused by the curvature pass
    )
    return curve.frame()
