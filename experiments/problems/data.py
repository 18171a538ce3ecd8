"""Data sets for the experiments: sklearn digits offline, torchvision sets from disk.

Every data set is held in memory as a :class:`ImageData` with a fixed train/test split
and a fixed input normalisation, both documented below.

* ``digits`` (default, offline): scikit-learn's bundled 1797 handwritten digits,
  ``[1, 8, 8]`` images with integer pixel values 0..16. The split is stratified with
  ``random_state=0``: 1437 training and 360 test images. Pixels are divided by 16 and
  standardised with the mean and standard deviation of all training pixels.
* ``mnist`` / ``fashion_mnist`` (``[1, 28, 28]``) and ``cifar10`` (``[3, 32, 32]``):
  torchvision's official train (60k / 50k) and test (10k) splits, read from
  ``--data-dir`` with ``download=False``. Pixels are scaled to [0, 1] and standardised
  with the usual per-channel constants listed in :data:`NORMALISATION`.

Security: torchvision reads the CIFAR-10 files (``cifar-10-batches-py``) with
:mod:`pickle`, which executes code from a crafted file; use copies obtained from the
official source. The MNIST files are raw IDX arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

#: Per-channel (mean, std) of [0, 1]-scaled pixels, the constants used in the field.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")

#: Shape of one input of each data set.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}

_TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
}

_HOW_TO_GET = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fashion_mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
}


@dataclass(frozen=True)
class ImageData:
    """An in-memory image classification data set with a fixed split.

    Attributes:
        name: Data set name, one of :data:`DATASETS`.
        train_x: Normalised training inputs ``[N_train, *input_shape]``.
        train_y: Training labels ``[N_train]`` (int64).
        test_x: Normalised test inputs ``[N_test, *input_shape]``.
        test_y: Test labels ``[N_test]`` (int64).
        num_classes: Number of classes ``C``.

    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 8, 8)``."""
        return tuple(self.train_x.shape[1:])

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """Return inputs and labels of the ``'train'`` or ``'test'`` split."""
        if name == "train":
            return self.train_x, self.train_y
        if name == "test":
            return self.test_x, self.test_y
        raise ValueError(f"Unknown split {name!r}; use 'train' or 'test'.")


def load_data(name: str = "digits", data_dir: str | Path | None = None) -> ImageData:
    """Load a data set by name.

    Args:
        name: One of :data:`DATASETS`. Default: ``'digits'``.
        data_dir: Folder holding the torchvision files; required for every data set
            but ``'digits'``, ignored for ``'digits'``. Nothing is ever downloaded.

    Returns:
        The data set with its fixed split and normalisation.

    Raises:
        ValueError: If ``name`` is unknown or ``data_dir`` is missing.
        FileNotFoundError: If the files are not under ``data_dir``; the message says
            how to obtain them.

    """
    if name == "digits":
        return load_digits()
    if name not in _TORCHVISION_CLASSES:
        raise ValueError(f"Unknown data set {name!r}; choose one of {DATASETS}.")
    if data_dir is None:
        raise ValueError(
            f"Data set {name!r} is read from disk: pass --data-dir pointing at the "
            "folder holding the torchvision files, or use the offline 'digits'."
        )
    return _load_torchvision(name, Path(data_dir))


def load_digits() -> ImageData:
    """Scikit-learn's digits, split and normalised as described in the module doc."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=360, random_state=0, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return ImageData("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test], 10)


def _load_torchvision(name: str, root: Path) -> ImageData:
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(_missing_message(name, root)) from err
    mean, std = NORMALISATION[name]
    train_x, train_y = _to_tensors(train, mean, std)
    test_x, test_y = _to_tensors(test, mean, std)
    return ImageData(name, train_x, train_y, test_x, test_y, 10)


def _to_tensors(dataset, mean: tuple[float, ...], std: tuple[float, ...]):
    data = torch.as_tensor(dataset.data)
    x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    shape = (1, len(mean), 1, 1)
    x = (x.float() / 255.0 - torch.tensor(mean).view(shape)) / torch.tensor(std).view(
        shape
    )
    return x.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)


def _missing_message(name: str, root: Path) -> str:
    cls = _TORCHVISION_CLASSES[name]
    return (
        f"Could not find {name!r} under {root} (expected {root}/{_HOW_TO_GET[name]}). "
        "This project never downloads data. Fetch the files once on a machine with "
        f'internet access, e.g. `python -c "import torchvision; torchvision.datasets.'
        f"{cls}('{root}', download=True); torchvision.datasets.{cls}('{root}', "
        'train=False, download=True)"`, then copy the folder here and pass '
        f"--data-dir {root}."
    )
