"""Model factories of the test problems: ``(input_shape, num_classes) -> nn.Module``.

Every model is built from layers BackPACK supports (``nn.Sequential`` of ``Conv2d``,
``Linear``, ``ReLU``, ``MaxPool2d``, ``Flatten``), except :func:`resnet18`, a
torchvision ResNet-18 meant for ``backpack.extend(model, use_converter=True)``. Each
factory draws its initialisation from torch's global generator: seed it first.
"""

from __future__ import annotations

from math import prod

from torch import nn


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


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small CNN for 8x8 digits: 13,706 parameters on ``[1, 8, 8]`` inputs.

    Two 3x3 'same' convolutions (16, 32 channels), each followed by ReLU and 2x2
    max-pooling, then a fully-connected ReLU layer of width 64 and the output layer;
    PyTorch's default initialisation. The registry's ``digits_2c2d`` has 325k
    parameters and makes every Newton step ~0.4 s on a core; this one is the default
    problem of :mod:`experiments.lanczos_newton`.
    """
    channels, height, width = input_shape
    flat = 32 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _deepobs_init(model: nn.Module) -> None:
    """Initialise like DeepOBS: Xavier normal convs, Xavier uniform linears."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
