"""Registry of test problems in the DeepOBS spirit: ``(data set, model, loss)`` by name.

Every model is built from layers BackPACK supports (``nn.Sequential`` of ``Conv2d``,
``Linear``, ``ReLU``, ``MaxPool2d``, ``Flatten``), except ``cifar10_resnet18`` which is
a torchvision ResNet-18 meant for ``backpack.extend(model, use_converter=True)``; its
batch norm layers must be in eval mode when curvature is computed.

Example:
    >>> problem = get_problem("digits_mlp")
    >>> model = problem.make_model()
    >>> sum(p.numel() for p in model.parameters())
    3466

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from experiments.common.data import ImageData, load_data


@dataclass(frozen=True)
class Problem:
    """A test problem.

    Attributes:
        name: Registry name.
        dataset: Data set name (see :mod:`experiments.common.data`).
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


INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: flatten and one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (32, 32)
) -> nn.Module:
    """Fully-connected ReLU network with the given hidden widths."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(input_shape)
    for out in hidden:
        layers += [nn.Linear(width, out), nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn_2c2d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DeepOBS 2C2D: two 5x5 'same' convs (32, 64) with 2x2 max-pooling, fc 1024.

    On 28x28 inputs this has 3,274,634 parameters; on 8x8 digits 325,514.
    """
    channels, height, width = input_shape
    flat = 64 * (height // 4) * (width // 4)
    model = nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(flat, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_classes),
    )
    _deepobs_init(model)
    return model


def cnn_3c3d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DeepOBS 3C3D (895,210 parameters on CIFAR-10).

    Conv 64 5x5 valid, max-pool 3 stride 2, conv 96 3x3 valid, max-pool, conv 128 3x3
    same, max-pool, then fc 512, 256, ``num_classes`` with ReLU. TensorFlow's 'same'
    pooling pads asymmetrically; here ``padding=1`` gives the same output sizes
    (28 -> 14 -> 6 -> 3 on 32x32 inputs), and after ReLU zero padding equals
    ignoring the border.
    """
    channels, height, _ = input_shape
    size = height - 4
    size = (size + 2 - 3) // 2 + 1
    size = ((size - 2) + 2 - 3) // 2 + 1
    size = (size + 2 - 3) // 2 + 1
    model = nn.Sequential(
        nn.Conv2d(channels, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(),
        nn.Linear(128 * size * size, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )
    _deepobs_init(model)
    return model


def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Torchvision ResNet-18 with ``num_classes`` outputs (use BackPACK's converter)."""
    import torchvision

    if input_shape[0] != 3:
        raise ValueError(f"ResNet-18 expects 3 input channels, got {input_shape}.")
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    # BackPACK's second-order extensions lack AdaptiveAvgPool2d; the feature map
    # after layer4 is ceil(H/32) x ceil(W/32), so a plain average pool is identical.
    final = (-(-input_shape[1] // 32), -(-input_shape[2] // 32))
    model.avgpool = nn.AvgPool2d(final)
    return model


def _deepobs_init(model: nn.Module) -> None:
    """Initialise like DeepOBS: Xavier normal convs, Xavier uniform linears."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


_PROBLEMS = [
    Problem("digits_logreg", "digits", logreg),
    Problem("digits_mlp", "digits", mlp),
    Problem("digits_2c2d", "digits", cnn_2c2d),
    Problem("mnist_logreg", "mnist", logreg),
    Problem("mnist_mlp", "mnist", mlp),
    Problem("mnist_2c2d", "mnist", cnn_2c2d),
    Problem("fashion_mnist_2c2d", "fashion_mnist", cnn_2c2d),
    Problem("cifar10_3c3d", "cifar10", cnn_3c3d),
    Problem("cifar10_resnet18", "cifar10", resnet18, True, True),
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


def make_extended(
    problem: Problem, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """Build a seeded model and loss, both extended for BackPACK.

    Args:
        problem: The problem.
        input_shape: Shape of one input.
        num_classes: Number of classes.
        seed: Seed for the initialisation. Default: ``0``.

    Returns:
        ``(model, loss_fn)`` after ``backpack.extend``; models with batch norm are
        put in eval mode.

    """
    from backpack import extend

    torch.manual_seed(seed)
    model = problem.make_model(input_shape, num_classes)
    if problem.has_batchnorm:
        model.eval()
    model = extend(model, use_converter=problem.use_converter)
    return model, extend(problem.make_loss())


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
