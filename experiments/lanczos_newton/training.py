"""One training run of the Lanczos-Newton comparison: a step budget, then a time budget.

Every run first takes ``steps`` optimisation steps (the matched-steps comparison) and
then keeps going until its training wall time reaches ``time_budget`` seconds (the
matched-time comparison), at most ``max_steps`` steps in all. The run is
:func:`experiments.common.training.train_loop` with an evaluation
:class:`~experiments.common.callbacks.Curve`: mini-batches are a pure function of
seed and step, so every optimizer sees the same batches in the same order; the
curvature batch of the Lanczos refreshes is a fixed random subset of the training
set, the same for both Lanczos variants.

Wall time counts what an optimizer needs to move the parameters: forward, backward
(inside BackPACK for the Newton optimizers), ``step()``, and for the Lanczos
optimizers every refresh, the first one (part of the set-up) included. The
evaluations on the full training and test sets are not counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch

from experiments.common.callbacks import Curve
from experiments.common.optimizers import bootstrap_grid, make_optimizer
from experiments.common.training import LoopState, train_loop
from experiments.problems import ImageData, Problem, get_problem, make_seeded
from vivitlib.optim import BootstrapDamping, ConstantDamping, LanczosDampedNewton

OPTIMIZERS = (
    "sgd",
    "adam",
    "gram_bootstrap",
    "lanczos_constant",
    "lanczos_bootstrap",
)

#: Names in :mod:`experiments.common.optimizers` of the first three.
_COMMON_NAMES = {
    "sgd": "sgd",
    "adam": "adam",
    "gram_bootstrap": "newton_bootstrap_floor",
}


#: The default problem of this study (see :func:`experiments.problems.small_cnn`).
SMALL_CNN = get_problem("digits_small_cnn")


@dataclass(frozen=True)
class RunConfig:
    """Hyperparameters of one run.

    Attributes:
        optimizer: One of :data:`OPTIMIZERS`.
        lr: Learning rate.
        steps: Step budget of the matched-steps comparison.
        time_budget: Training seconds of the matched-time comparison.
        max_steps: Cap on the steps taken to reach ``time_budget``.
        batch_size: Mini-batch size.
        seed: Seed of initialisation, batch order, curvature batch and randomness.
        eval_every: Evaluate every this many steps up to ``steps``.
        time_points: Evaluations on an even grid of ``time_budget``.
        damping: Constant ``δ`` of ``lanczos_constant``; smallest bootstrap
            candidate of ``gram_bootstrap`` and ``lanczos_bootstrap`` (the grid runs
            log-spaced up to 100, 10 per decade). Unused by SGD and Adam.
        mc_samples: MC samples of the per-sample GGN (Gram space and ``λ_nk``).
        k: Lanczos directions.
        refresh_every: Steps between Lanczos refreshes.
        curvature_batch_size: Samples of the fixed curvature batch of the refreshes.
        curvature: ``'ggn'`` or ``'hessian'`` for the refreshes.
        momentum: SGD momentum. Default: ``0.9``.
    """

    optimizer: str
    lr: float
    steps: int
    time_budget: float
    max_steps: int
    batch_size: int
    seed: int
    eval_every: int
    time_points: int
    damping: float
    mc_samples: int = 1
    k: int = 20
    refresh_every: int = 10
    curvature_batch_size: int = 256
    curvature: str = "ggn"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        """Validate the optimizer name and budgets."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}.")
        if self.max_steps < self.steps or self.time_budget < 0:
            raise ValueError("need max_steps >= steps and time_budget >= 0.")


def curvature_batch(data: ImageData, size: int, seed: int):
    """The fixed curvature batch: ``size`` training samples drawn with ``seed``."""
    generator = torch.Generator().manual_seed(2_000_003 + seed)
    idx = torch.randperm(len(data.train_y), generator=generator)[:size]
    return data.train_x[idx], data.train_y[idx]


def _warm_up() -> None:
    """Pay one-off costs before any clock runs.

    The first ``torch.optim.Optimizer`` built in a process imports ``torch._dynamo``
    (seconds); without this the first run's set-up time would include it.
    """
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def _build(problem: Problem, data: ImageData, config: RunConfig):
    """Model, loss, optimizer and the seconds the optimizer's set-up took."""
    _warm_up()
    extended = config.optimizer.startswith(("gram", "lanczos"))
    model, loss_fn = make_seeded(
        problem, data.input_shape, data.num_classes, config.seed, extended=extended
    )
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    if config.optimizer in _COMMON_NAMES:
        optimizer = make_optimizer(
            _COMMON_NAMES[config.optimizer], model.parameters(), lr=config.lr,
            momentum=config.momentum, seed=config.seed, damping=config.damping,
            mc_samples=config.mc_samples,
        )  # fmt: skip
    else:
        optimizer = _lanczos(config, model, loss_fn, data)
    return model, loss_fn, optimizer, time.perf_counter() - start


class TimedLanczos(LanczosDampedNewton):
    """:class:`~vivitlib.optim.LanczosDampedNewton` timing every refresh.

    The seconds of each refresh are appended to :attr:`refresh_times`.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.refresh_times: list[float] = []
        super().__init__(*args, **kwargs)

    def refresh(self):
        """Refresh the directions (see the parent class) and time it."""
        start = time.perf_counter()
        record = super().refresh()
        self.refresh_times.append(time.perf_counter() - start)
        return record


def _lanczos(config, model, loss_fn, data) -> TimedLanczos:
    if config.optimizer == "lanczos_constant":
        # Deep Curvature suite: refresh eigenvalues |λ_k| plus a constant damping
        damping, step_curvature = ConstantDamping(config.damping), "refresh"
    else:
        grid = bootstrap_grid(config.damping)
        damping = BootstrapDamping(candidates=grid, generator=config.seed)
        step_curvature = "batch"
    optimizer = TimedLanczos(
        model,
        loss_fn,
        curvature_batch(data, config.curvature_batch_size, config.seed),
        k=config.k,
        refresh_every=config.refresh_every,
        curvature=config.curvature,
        damping=damping,
        lr=config.lr,
        step_curvature=step_curvature,
        mc_samples=config.mc_samples,
        generator=torch.Generator().manual_seed(config.seed),
        safeguards=False,  # the plain method, as tuned (see run.py)
    )
    if not optimizer.refresh_history:  # the first refresh is part of the set-up
        optimizer.refresh()
    return optimizer


def _refresh_stats(optimizer, setup_time: float) -> dict:
    """Curve columns: refreshes so far, their products and time (all cumulative).

    The set-up (construction and first refresh) counts as refresh time.
    """
    history = getattr(optimizer, "refresh_history", [])
    products = sum(r.num_products for r in history)
    times = getattr(optimizer, "refresh_times", [])
    return {
        "refreshes": len(history),
        "products": products,
        "products_per_refresh": products / len(history) if history else math.nan,
        "unconverged_refreshes": sum(not r.converged for r in history),
        "refresh_time_s": setup_time + sum(times[1:]) if times else 0,
    }


class _Schedule:
    """When to evaluate and when to stop (see the module docstring)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.interval = config.time_budget / max(config.time_points, 1)
        self.next_time = self.interval

    def done(self, step: int, elapsed: float, diverged: bool) -> bool:
        cfg = self.config
        budgets_met = step >= cfg.steps and elapsed >= cfg.time_budget
        return diverged or budgets_met or step >= cfg.max_steps

    def evaluate(self, step: int, elapsed: float, done: bool) -> bool:
        cfg = self.config
        on_grid = step % cfg.eval_every == 0 or step == cfg.steps
        on_steps = step <= cfg.steps and on_grid
        on_time = self.interval > 0 and elapsed >= self.next_time
        while self.interval > 0 and self.next_time <= elapsed:
            self.next_time += self.interval
        return done or on_steps or on_time


def train(problem: Problem, data: ImageData, config: RunConfig) -> pd.DataFrame:
    """Train one model and log evaluations.

    Args:
        problem: The problem (model factory and loss).
        data: Its data set.
        config: Hyperparameters and budgets.

    Returns:
        One row per evaluation with columns ``step, time_s, step_time_s,
        batch_loss, train_loss, train_accuracy, test_loss, test_accuracy,
        refreshes, products, products_per_refresh, unconverged_refreshes,
        refresh_time_s, diverged``. ``time_s`` is the cumulative training time
        (optimizer set-up included), ``step_time_s`` the mean time per step since
        the previous row, ``batch_loss`` the mean mini-batch loss since then; the
        refresh columns are cumulative (zero and NaN for optimizers without
        refreshes). A diverged run (see
        :data:`experiments.common.callbacks.DIVERGED`) ends with a flagged row.
    """
    model, loss_fn, optimizer, setup_time = _build(problem, data, config)
    schedule = _Schedule(config)
    curve = Curve(
        lambda state, done: schedule.evaluate(state.step, state.elapsed, done),
        extras=[lambda state: _refresh_stats(state.optimizer, setup_time)],
    )
    train_loop(
        LoopState(model, loss_fn, optimizer, data, elapsed=setup_time),
        batch_size=config.batch_size,
        seed=config.seed,
        until=lambda state: schedule.done(state.step, state.elapsed, False),
        callbacks=[curve],
        refused=(ValueError,),  # non-finite outputs are refused by the curvature pass
    )
    return curve.frame()
