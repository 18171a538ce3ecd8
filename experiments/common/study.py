"""Train-then-evaluate orchestration shared by the studies that follow training.

A run trains one problem with one optimizer, writing checkpoints at the evaluation
steps (resuming from the latest checkpoint), then evaluates every checkpoint into one
table per ``(run, step)`` — skipped when the table is already on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from experiments.common.checkpoints import checkpoint_path, load_checkpoint
from experiments.common.locking import claim_folder
from experiments.common.results import (
    cached_table,
    config_key,
    recorded_options,
    write_table,
)
from experiments.common.resumable import TrainConfig, train
from experiments.common.training import Callback
from experiments.problems import ImageData, Problem, make_extended

Evaluator = Callable[[nn.Module, nn.Module, int], pd.DataFrame]

#: Command-line options that only decide which runs and checkpoints exist; each
#: evaluation table's key already names its run (problem, optimizer, lr, batch size,
#: seed) and step, which is all these options change about it.
TRAINING_OPTIONS = frozenset(
    {"problem", "optimizers", "epochs", "batch_size", "lr_sgd", "lr_adam", "steps"}
    | {"seed"}
)


@dataclass(frozen=True)
class Run:
    """One training run of a study.

    Attributes:
        problem: The problem.
        data: Its data.
        train_config: Training hyper-parameters.
        out_dir: The study's output folder.

    """

    problem: Problem
    data: ImageData
    train_config: TrainConfig
    out_dir: Path

    @property
    def label(self) -> dict[str, object]:
        """Columns identifying the run in result tables."""
        cfg = self.train_config
        return {
            "problem": self.problem.name,
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
        }

    @property
    def checkpoint_dir(self) -> Path:
        """Folder of this run's checkpoints."""
        return Path(self.out_dir) / "checkpoints" / config_key(self.label)

    def fresh_model(self) -> tuple[nn.Module, nn.Module]:
        """Build a BackPACK-extended model (seeded initialisation) and loss."""
        return make_extended(
            self.problem,
            self.data.input_shape,
            self.data.num_classes,
            self.train_config.seed,
        )

    def load(self, step: int) -> tuple[nn.Module, nn.Module]:
        """Load the model at ``step`` (from its checkpoint) and the loss."""
        model, loss_fn = self.fresh_model()
        path = checkpoint_path(self.checkpoint_dir, step)
        load_checkpoint(path, model, config=self.train_config)
        return model, loss_fn

    def plain_model(self, trained: nn.Module) -> nn.Module:
        """Copy ``trained``'s weights into a model without BackPACK hooks (eval mode).

        For matrix-free (double-backward) curvature, which BackPACK's hooks would
        slow down; models that need BackPACK's converter are not supported.
        """
        if self.problem.use_converter:
            raise NotImplementedError(
                f"{self.problem.name} uses BackPACK's converter; its state cannot be "
                "copied into a plain model. Use a problem without residual blocks."
            )
        model = self.problem.make_model(self.data.input_shape, self.data.num_classes)
        model.load_state_dict(trained.state_dict())
        return model.eval()


def train_run(
    run: Run,
    save_steps: Iterable[int],
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> pd.DataFrame:
    """Train (or resume) ``run``, checkpointing at ``save_steps``; write its log CSV.

    Claims ``run.out_dir`` for this process first (see
    :mod:`experiments.common.locking`); a complete run in a read-only folder writes
    nothing. ``callbacks`` join the training loop's (see
    :func:`experiments.common.resumable.train`).
    """
    claim_folder(run.out_dir)
    model, loss_fn = run.fresh_model()
    log = train(
        model,
        loss_fn,
        run.data,
        run.train_config,
        run.checkpoint_dir,
        save_steps,
        progress=progress,
        callbacks=callbacks,
    )
    write_table(log, Path(run.out_dir) / "logs" / f"{config_key(run.label)}.csv")
    return log


def evaluate_checkpoints(
    run: Run,
    steps: Iterable[int],
    evaluate: Evaluator,
    name: str = "eval",
    options: Mapping[str, object] | None = None,
) -> pd.DataFrame:
    """Evaluate the checkpoints of ``run`` at ``steps``, one cached table per step.

    Args:
        run: A trained run.
        steps: Checkpoint steps to evaluate.
        evaluate: ``(model, loss_fn, step) -> DataFrame`` for one checkpoint; the
            model has batch norm in eval mode.
        name: Names this kind of evaluation in the table keys. Default: ``'eval'``.
        options: The options that change the evaluation's numbers besides the run
            and the step (e.g. ``--eval-batch-size``); they key the cached tables
            (see :func:`~experiments.common.results.cached_table`). Default: the
            arguments recorded by
            :func:`~experiments.common.results.write_environment` for
            ``run.out_dir``, without :data:`TRAINING_OPTIONS`.

    Returns:
        The tables of all steps, concatenated, with the run's label columns and the
        columns ``step`` and ``epoch``.

    """
    if options is None:
        options = recorded_options(run.out_dir, exclude=TRAINING_OPTIONS)
    frames = []
    steps_per_epoch = len(run.data.train_y) // run.train_config.batch_size
    for step in sorted(set(steps)):
        config = {
            "eval": name,
            **run.label,
            "step": step,
            "epoch": round(step / steps_per_epoch, 3),
        }

        def compute(step: int = step) -> pd.DataFrame:
            model, loss_fn = run.load(step)
            model.eval()
            torch.manual_seed(run.train_config.seed + step)
            return evaluate(model, loss_fn, step)

        table = cached_table(run.out_dir, config, compute, options)
        frames.append(table.drop(columns="eval"))
    return pd.concat(frames, ignore_index=True)


def train_and_evaluate(
    run: Run,
    steps: Iterable[int],
    evaluate: Evaluator,
    name: str = "eval",
    progress: bool = True,
    options: Mapping[str, object] | None = None,
) -> pd.DataFrame:
    """:func:`train_run` followed by :func:`evaluate_checkpoints` on ``steps``.

    Raises:
        ValueError: If a step lies outside ``[0, num_steps]`` of the run.

    """
    steps = sorted(set(steps))
    num_steps = run.train_config.num_steps
    outside = [step for step in steps if not 0 <= step <= num_steps]
    if outside:
        raise ValueError(
            f"Evaluation steps {outside} lie outside the run's 0..{num_steps} steps; "
            "pass --steps within that range or train longer (--epochs)."
        )
    train_run(run, steps, progress=progress)
    return evaluate_checkpoints(run, steps, evaluate, name, options)


def default_steps(num_steps: int, count: int = 3) -> list[int]:
    """Pick evaluation steps: start, early (5 %), end; log-spaced if ``count`` > 3."""
    if count <= 3:
        return sorted({0, max(1, num_steps // 20), num_steps})
    points = torch.logspace(
        0, torch.log10(torch.tensor(float(max(num_steps, 1)))), count - 1
    )
    return sorted({0, *(int(p) for p in points.round()), num_steps})
