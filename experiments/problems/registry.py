"""Registry of test problems in the DeepOBS spirit: ``(data set, model, loss)`` by name.

The models come from :mod:`experiments.problems.models`, the data sets from
:mod:`experiments.problems.data`. ``cifar10_resnet18`` needs
``backpack.extend(model, use_converter=True)``; its batch norm layers must be in eval
mode when curvature is computed.

Example:
    >>> problem = get_problem("digits_mlp")
    >>> model = problem.make_model()
    >>> sum(p.numel() for p in model.parameters())
    3466

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from experiments.problems import models
from experiments.problems.data import INPUT_SHAPES, ImageData, load_data


@dataclass(frozen=True)
class Problem:
    """A test problem.

    Attributes:
        name: Registry name.
        dataset: Data set name (see :mod:`experiments.problems.data`).
        make_model: ``(input_shape, num_classes) -> nn.Module``; initialise the seed
            first, the factory draws from torch's global generator.
        use_converter: Whether BackPACK needs ``extend(model, use_converter=True)``.
        has_batchnorm: Whether the model holds batch norm (eval mode for curvature).

    """

    name: str
    dataset: str
    _factory: Callable[[tuple[int, ...], int], nn.Module]
    use_converter: bool = False
    has_batchnorm: bool = False

    def load_data(self, data_dir: str | None = None) -> ImageData:
        """Load this problem's data set (``data_dir`` only for torchvision sets)."""
        return load_data(self.dataset, data_dir)

    def make_model(
        self, input_shape: tuple[int, ...] | None = None, num_classes: int = 10
    ) -> nn.Module:
        """Build a freshly initialised model.

        Args:
            input_shape: Shape of one input; default: the data set's usual shape.
            num_classes: Number of outputs. Default: ``10``.

        """
        shape = input_shape if input_shape is not None else INPUT_SHAPES[self.dataset]
        return self._factory(tuple(shape), num_classes)

    @staticmethod
    def make_loss() -> nn.Module:
        """Create the loss function: mean-reduced cross-entropy."""
        return nn.CrossEntropyLoss()


_PROBLEMS = [
    Problem("digits_logreg", "digits", models.logreg),
    Problem("digits_mlp", "digits", models.mlp),
    Problem("digits_2c2d", "digits", models.cnn_2c2d),
    Problem("mnist_logreg", "mnist", models.logreg),
    Problem("mnist_mlp", "mnist", models.mlp),
    Problem("mnist_2c2d", "mnist", models.cnn_2c2d),
    Problem("fashion_mnist_2c2d", "fashion_mnist", models.cnn_2c2d),
    Problem("cifar10_3c3d", "cifar10", models.cnn_3c3d),
    Problem("cifar10_resnet18", "cifar10", models.resnet18, True, True),
    Problem("digits_small_cnn", "digits", models.small_cnn),
]
PROBLEMS: dict[str, Problem] = {p.name: p for p in _PROBLEMS}


def get_problem(name: str) -> Problem:
    """Look up a problem by name.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the names.

    """
    if name not in PROBLEMS:
        raise ValueError(f"Unknown problem {name!r}; choose one of {sorted(PROBLEMS)}.")
    return PROBLEMS[name]


def make_seeded(
    problem: Problem,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    *,
    extended: bool = True,
) -> tuple[nn.Module, nn.Module]:
    """Build a seeded model and its loss, extended for BackPACK unless told not to.

    Args:
        problem: The problem.
        input_shape: Shape of one input.
        num_classes: Number of classes.
        seed: Seed for the initialisation. Default: ``0``.
        extended: Pass model and loss through ``backpack.extend`` (models with
            batch norm are then put in eval mode). Default: ``True``.

    Returns:
        ``(model, loss_fn)``.

    """
    torch.manual_seed(seed)
    model = problem.make_model(input_shape, num_classes)
    if not extended:
        return model, problem.make_loss()
    from backpack import extend

    if problem.has_batchnorm:
        model.eval()
    model = extend(model, use_converter=problem.use_converter)
    return model, extend(problem.make_loss())


def make_extended(
    problem: Problem, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """:func:`make_seeded` with ``extended=True``: both extended for BackPACK."""
    return make_seeded(problem, input_shape, num_classes, seed)


@dataclass(frozen=True)
class TrainingDefaults:
    """Default training hyper-parameters of a problem.

    Attributes:
        sgd_lr: SGD (momentum 0.9) learning rate.
        adam_lr: Adam learning rate.
        batch_size: Training mini-batch size.
        epochs: Training epochs.

    """

    sgd_lr: float = 0.05
    adam_lr: float = 0.002
    batch_size: int = 64
    epochs: int = 40


#: DeepOBS baselines (Schneider et al., 2019; Dangel et al., 2020) for the large
#: problems, hand-tuned short runs for the digits problems.
TRAINING_DEFAULTS: dict[str, TrainingDefaults] = {
    "cifar10_3c3d": TrainingDefaults(0.00398, 0.000298, 128, 100),
    "cifar10_resnet18": TrainingDefaults(0.05, 0.001, 128, 100),
    "mnist_2c2d": TrainingDefaults(0.0316, 0.001, 128, 100),
    "fashion_mnist_2c2d": TrainingDefaults(0.0316, 0.001, 128, 100),
    "mnist_logreg": TrainingDefaults(0.1, 0.001, 128, 50),
    "mnist_mlp": TrainingDefaults(0.05, 0.001, 128, 50),
}


def training_defaults(name: str) -> TrainingDefaults:
    """Return the default training hyper-parameters of problem ``name``."""
    return TRAINING_DEFAULTS.get(name, TrainingDefaults())
