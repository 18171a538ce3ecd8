"""Test problems: data sets, models and the registry naming ``(data, model, loss)``.

The bottom layer of the experiments: it imports nothing from
:mod:`experiments.common` or from a study, so studies and the common harness build
on it (studies → :mod:`experiments.common` → :mod:`experiments.problems`).
"""

from experiments.problems.data import DATASETS, INPUT_SHAPES, ImageData, load_data
from experiments.problems.models import (
    cnn_2c2d,
    cnn_3c3d,
    logreg,
    mlp,
    resnet18,
    small_cnn,
)
from experiments.problems.registry import (
    PROBLEMS,
    TRAINING_DEFAULTS,
    Problem,
    TrainingDefaults,
    get_problem,
    make_extended,
    make_seeded,
    training_defaults,
)

__all__ = [
    "DATASETS",
    "INPUT_SHAPES",
    "PROBLEMS",
    "TRAINING_DEFAULTS",
    "ImageData",
    "Problem",
    "TrainingDefaults",
    "cnn_2c2d",
    "cnn_3c3d",
    "get_problem",
    "load_data",
    "logreg",
    "make_extended",
    "make_seeded",
    "mlp",
    "resnet18",
    "small_cnn",
    "training_defaults",
]
