"""The data side of the curvature operators: validation, counts, weights, changes.

:class:`DataMixin` is mixed into
:class:`~vivitlib.hessianfree._base.CurvatureOperator`; it uses the
operator's ``_data``, ``_loss_fn``, ``_reduction``, ``params``, ``device`` and
distributed settings, and sets ``num_data`` and the mean's denominator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vivitlib.hessianfree import allreduce
from vivitlib.hessianfree._inputs import check_batch
from vivitlib.hessianfree._loss import mean_denominator


class DataMixin:
    """Batch validation, sample counts, batch weights and data-change detection."""

    def _count_data(self) -> int:
        """Validate the batches, set ``num_data`` and the mean's denominator.

        Returns:
            The number of local batches.
        """
        local_batches, num_data, denominator = 0, 0, 0.0
        for index, batch in enumerate(self._data):
            size = self._check_batch(index, batch)
            local_batches += 1
            num_data += size
            denominator += (
                mean_denominator(self._loss_fn, batch[1], size) if size else 0
            )
        if self._distributed:
            counts = allreduce.all_reduce_counts(
                [num_data, denominator], self.device, self._group, self._timeout
            )
            num_data, denominator = int(counts[0]), counts[1]
        if num_data == 0:
            raise ValueError(
                "data holds no samples (an empty loader or only empty batches): "
                "pass at least one non-empty (X, y) batch."
            )
        if denominator <= 0:
            raise ValueError(
                "No sample contributes to the loss: every target equals the loss's "
                "ignore_index or has class weight 0, so the mean loss is undefined. "
                "Pass data with at least one counted target."
            )
        self.num_data, self._denominator = num_data, denominator
        return local_batches

    def _batch_weight(self, y: Any, batch_size: int) -> float:
        """Weight of a batch's product in the full-data product."""
        if self._reduction == "sum":
            return 1.0
        return mean_denominator(self._loss_fn, y, batch_size) / self._denominator

    def _check_batch(self, index: int, batch: Any) -> int:
        """Validate batch ``index`` when the operator is built; return its size."""
        return check_batch(index, batch, self.params)

    @staticmethod
    def _batch_size(X: Any, y: Any) -> int:
        return X.shape[0] if isinstance(X, Tensor) else len(y)

    def _to_device(self, X: Any, y: Any) -> tuple[Any, Any]:
        move = lambda t: t.to(self.device) if isinstance(t, Tensor) else t  # noqa: E731
        return move(X), move(y)

    def _data_key(self) -> tuple[list | None, list | None]:
        """Layout (ids, pointers, shapes) and versions of list data, else Nones."""
        if not isinstance(self._data, list | tuple):
            return None, None
        tensors = [[t for t in b if torch.is_tensor(t)] for b in self._data]
        layout = [
            (id(b), [(id(t), t.data_ptr(), t.shape) for t in ts])
            for b, ts in zip(self._data, tensors)
        ]
        return layout, [[t._version for t in ts] for ts in tensors]

    def _data_changed(self) -> bool:
        """Whether list data changed since the cache was built; recount new batches.

        Raises:
            ValueError: If batches were replaced while several ranks are active.
        """
        layout, versions = self._data_key()
        if layout != self._layout:  # batches replaced: sizes may differ
            if self._distributed:
                raise ValueError(
                    "The list of batches changed since the operator was built; "
                    "with several ranks, build a new operator on every rank."
                )
            self._count_data()
            self._layout = layout
            return True
        return versions != self._cache_versions
