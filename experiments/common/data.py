"""Old import path of the data sets, kept for :mod:`experiments.optimizer_benchmark`.

The data sets live in :mod:`experiments.problems.data`; import them from there.
"""

from experiments.problems.data import ImageData, load_data, load_digits

__all__ = ["ImageData", "load_data", "load_digits"]
