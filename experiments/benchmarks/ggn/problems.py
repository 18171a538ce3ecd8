"""Benchmark problems: MLPs, DeepOBS 2C2D and 3C3D, all-conv and VGG-BN nets, ResNets.

Every problem is rebuilt from a seed, so vivitlib and vivit see the same model,
data and targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from backpack import extend
from torch import Tensor, nn

from experiments.problems import cnn_2c2d, cnn_3c3d, resnet18

PROBLEMS = (
    "digits_mlp",
    "wide_mlp",
    "2c2d",
    "3c3d",
    "allcnn",
    "vgg_bn",
    "resnet",
    "resnet18",
)
#: Networks off the benchmark's default table, to check the library where it
#: was not tuned (issue 13, session 8); run them with ``--problems ... --sizes``.
PROBES = ("lenet", "mlp_mse", "strided", "conv1d", "3c3d_c100", "vgg")


@dataclass
class Problem:
    """An extended model with its loss and one batch."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor

    @property
    def params(self) -> list[nn.Parameter]:
        """Trainable parameters, in model order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def layer_groups(self) -> list[dict[str, list[nn.Parameter]]]:
        """One ``{"params": [...]}`` group per module that owns parameters."""
        groups = []
        for module in self.model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                groups.append({"params": own})
        return groups

    def zero_grad(self) -> None:
        """Drop ``.grad`` of every parameter."""
        for p in self.params:
            p.grad = None


class _Block(nn.Module):
    """``x + conv(relu(conv(x)))`` with same-size 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x + self.conv2(self.relu(self.conv1(x)))


def small_resnet() -> nn.Module:
    """Residual CNN for 3x32x32 inputs (about 78k parameters), for the converter."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        _Block(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        _Block(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def all_conv() -> nn.Module:
    """All-convolutional net for 3x32x32 inputs, about 70k parameters.

    Strided convolutions, tanh and sigmoid, global average pooling; no max
    pooling (off the paths 3C3D takes).
    """
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(8),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def vgg_bn(batch_norm: bool = True) -> nn.Module:
    """VGG-style net for 3x32x32 inputs, batch norm in eval mode, 331k parameters.

    Conv-BN-ReLU blocks (two at full resolution, then max pooling after each),
    dropout (eval) before a 1024-256-10 head: the Conv-BN-ReLU-MaxPool stacks
    of VGG and the batch norm layers of ResNets, off the DeepOBS nets' paths.
    ``batch_norm=False``: the same net without batch norm.
    """

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
        return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.MaxPool2d(2),
        *block(64, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(64 * 4 * 4, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


def _probe(name: str, batch_size: int) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """Model, loss, inputs and targets of one of :data:`PROBES`."""
    N, ce = batch_size, nn.CrossEntropyLoss()
    cifar, labels = torch.randn(N, 3, 32, 32), torch.randint(0, 10, (N,))
    if name == "lenet":  # LeNet-5: tanh, average pooling
        model = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, 10),
        )  # fmt: skip
        return model, ce, torch.randn(N, 1, 28, 28), labels
    if name == "mlp_mse":  # regression: ELU, LeakyReLU, five outputs
        model = nn.Sequential(nn.Linear(100, 256), nn.ELU(), nn.Linear(256, 256),
                              nn.LeakyReLU(), nn.Linear(256, 5))  # fmt: skip
        return model, nn.MSELoss(), torch.randn(N, 100), torch.randn(N, 5)
    if name == "strided":  # strided convolutions, LeakyReLU, average pooling
        model = nn.Sequential(
            nn.Conv2d(3, 64, 5, stride=2, padding=2), nn.LeakyReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(8),
            nn.Flatten(), nn.Linear(128, 10),
        )  # fmt: skip
        return model, ce, cifar, labels
    if name == "conv1d":  # dilated, strided 1-D convolutions, max pooling
        model = nn.Sequential(
            nn.Conv1d(4, 32, 5), nn.ReLU(), nn.Conv1d(32, 32, 5, stride=2, dilation=2),
            nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(32 * 29, 10),
        )  # fmt: skip
        return model, ce, torch.randn(N, 4, 128), labels
    if name == "3c3d_c100":  # 100 classes
        return cnn_3c3d((3, 32, 32), 100), ce, cifar, torch.randint(0, 100, (N,))
    if name == "vgg":
        return vgg_bn(batch_norm=False).eval(), ce, cifar, labels
    raise ValueError(f"Unknown problem {name!r}; choose one of {PROBLEMS + PROBES}.")


def _with_batch_statistics(model: nn.Module, X: Tensor) -> nn.Module:
    """``model`` in eval mode, its batch norm statistics those of the batch ``X``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average: one pass sets them
    with torch.no_grad():
        model.train()(X)
    return model.eval()


def _digits(batch_size: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = torch.as_tensor(bunch.data[:batch_size], dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target[:batch_size], dtype=torch.int64)
    return X, y


def wide_mlp() -> nn.Module:
    """784-1024-1024-10 ReLU MLP (MNIST-shaped input), 1.86 M parameters."""
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                         nn.ReLU(), nn.Linear(1024, 10))  # fmt: skip


def make_problem(
    name: str, batch_size: int, seed: int = 0, device: str = "cpu"
) -> Problem:
    """Build problem ``name`` with ``batch_size`` samples, deterministically.

    Args:
        name: One of :data:`PROBLEMS` or :data:`PROBES`. ``resnet18`` is
            torchvision's ResNet-18
            (10 classes, eval mode, final pooling as ``AvgPool2d`` so that
            vivit's stock BackPACK runs it too).
        batch_size: ``N``.
        seed: Seed for weights and random data (drawn on the CPU).
        device: Where model and data live.

    Returns:
        The extended problem (float32).

    Raises:
        ValueError: For an unknown name.
    """
    torch.manual_seed(seed)
    loss_fn: nn.Module = nn.CrossEntropyLoss()
    converter = False
    cifar = (batch_size, 3, 32, 32)
    if name == "digits_mlp":
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
        X, y = _digits(batch_size)
    elif name == "wide_mlp":
        model = wide_mlp()
        X, y = torch.randn(batch_size, 784), torch.randint(0, 10, (batch_size,))
    elif name == "2c2d":
        model = cnn_2c2d((1, 28, 28), 10)
        X, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    elif name == "allcnn":
        model = all_conv()
        X, y = torch.randn(*cifar), torch.randint(0, 10, (batch_size,))
    elif name == "vgg_bn":
        X, y = torch.randn(*cifar), torch.randint(0, 10, (batch_size,))
        model = _with_batch_statistics(vgg_bn(), X)
    elif name == "3c3d":
        model = cnn_3c3d((3, 32, 32), 10)
        X, y = torch.randn(*cifar), torch.randint(0, 10, (batch_size,))
    elif name == "resnet":
        model, converter = small_resnet(), True
        X, y = torch.randn(*cifar), torch.randint(0, 10, (batch_size,))
    elif name == "resnet18":
        model, converter = resnet18((3, 32, 32), 10).eval(), True
        X, y = torch.randn(*cifar), torch.randint(0, 10, (batch_size,))
    else:
        model, loss_fn, X, y = _probe(name, batch_size)
    model = extend(model, use_converter=converter).to(device)
    loss_fn = extend(loss_fn)
    return Problem(name, model, loss_fn, X.to(device), y.to(device))
