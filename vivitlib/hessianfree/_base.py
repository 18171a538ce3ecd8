"""Base class of the matrix-free curvature operators over a data set."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from vivitlib._checks import check_finite
from vivitlib._warnings import quiet_backward_hook_warning
from vivitlib.hessianfree import allreduce
from vivitlib.hessianfree._data import DataMixin
from vivitlib.hessianfree._finite import nonfinite_flag, resolve_flags
from vivitlib.hessianfree._inputs import (
    check_data,
    check_floating,
    check_model_state,
    check_params,
    check_reduction,
)
from vivitlib.hessianfree._state import ModelGuard


class CurvatureOperator(DataMixin):
    """Symmetric ``[D, D]`` curvature matrix of a loss over a data set.

    Subclasses implement one batch's product in :meth:`_build` (a state, e.g.
    a gradient graph, reusable for many vectors) and :meth:`_apply`. This class
    loops over the data, weights the batches, accumulates in float64,
    all-reduces across ``torch.distributed`` ranks and converts vectors.

    For ``L(θ) = (1/N) Σ_n ℓ_n`` (``reduction='mean'``) the batch with
    ``N_b`` samples is weighted by ``N_b / N``; with ``reduction='sum'`` by 1.
    For ``CrossEntropyLoss``/``NLLLoss`` with class weights or ignored
    targets, ``N_b`` and ``N`` are the loss's own denominators (summed
    weights of the kept targets), so the product is exact for any batching.
    Empty batches (and batches whose targets are all ignored) are skipped.

    Before every product the operator checks that dropout / batch norm are
    still in eval mode, that no parameter was frozen, converted or set to
    NaN/Inf, and that ``v`` and the product are finite; a cached graph is
    reused only while the parameters and buffers equal a snapshot taken when
    it was built (so ``p.data`` edits are seen too).

    Attributes:
        params: The parameters ``θ`` (``D`` entries in total).
        shape: ``(D, D)``.
        num_data: Number of samples ``N`` (over all ranks).
        num_products: Matrix-vector products made so far (a ``[D, k]`` input
            counts ``k``); the determinism check is not counted. Writable.

    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        params: Iterable[Tensor] | None = None,
        reduction: str | None = None,
        cache_graph: bool | None = None,
        check_deterministic: bool = True,
        distributed: bool | None = None,
        timeout: float | timedelta | None = None,
        progressbar: bool = False,
    ) -> None:
        """Validate the inputs, count the data and check determinism.

        Args:
            model: The model ``f(θ, x)``, in a deterministic state (eval mode
                for dropout and batch norm).
            loss_fn: Callable ``loss_fn(output, y)`` returning the batch loss.
            data: A ``DataLoader`` (``shuffle=False``), a list of ``(X, y)``
                batches, or one ``(X, y)`` pair.
            params: Parameters to differentiate, default all trainable ones.
            reduction: ``'mean'`` or ``'sum'``; default ``loss_fn.reduction``.
            cache_graph: Keep each batch's graph between products (fast, costs
                memory and one copy of the parameters). Default ``None`` caches
                when there is a single batch. The cache is rebuilt whenever a
                parameter or buffer differs from its value at build time, or a
                batch of list data was replaced or changed in place; call
                :meth:`clear_cache` after editing data through ``.data`` or
                changing a loader's dataset.
            check_deterministic: Compare two products of one random vector
                (not counted in ``num_products``). Default ``True``.
            distributed: All-reduce products over ``torch.distributed``;
                default ``None`` does so when a multi-rank group is active.
            timeout: Seconds (or ``timedelta``) after which a collective whose
                peers do not join raises instead of waiting for the process
                group's timeout (30 min by default); see
                :mod:`vivitlib.hessianfree.allreduce`. Default ``None``.
            progressbar: Show a ``tqdm`` bar over the batches. Default ``False``.

        Raises:
            TypeError: For inputs of the wrong type (also data whose floating
                inputs have another dtype than the parameters).
            ValueError: For a model in train mode with dropout/batch norm, a
                shuffling loader, bad or non-finite parameters, non-finite or
                empty data, an unknown reduction, or products that are not
                deterministic.

        """
        check_model_state(model)
        self._reduction = check_reduction(loss_fn, reduction)
        self._check_loss_fn(loss_fn)
        self.params = check_params(model, params)
        self._data = check_data(data)
        self._guard = ModelGuard(model, self.params)
        self._guard.check_finite()
        self._model = model
        self._loss_fn = loss_fn
        self._progressbar = progressbar
        self._distributed = allreduce.resolve_distributed(distributed)
        self._timeout = allreduce.check_timeout(timeout)
        self._group = allreduce.make_group(self._timeout) if self._distributed else None
        self._sizes = [p.numel() for p in self.params]
        dim = sum(self._sizes)
        self.shape = (dim, dim)
        self.num_products = 0
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype

        local_batches = self._count_data()
        self._cache_graph = local_batches == 1 if cache_graph is None else cache_graph
        self._cache: list[tuple[Any, float]] | None = None
        self._layout, self._cache_versions = self._data_key()
        if check_deterministic:
            self._check_deterministic()

    # ---- to implement -------------------------------------------------------
    def _check_loss_fn(self, loss_fn: Any) -> None:
        """Raise if the operator does not support ``loss_fn`` (default: all)."""

    def _build(self, X: Tensor, y: Tensor) -> Any:
        """Return a state from which products with one batch are computed."""
        raise NotImplementedError

    def _apply(self, state: Any, vec: list[Tensor], retain: bool) -> list[Tensor]:
        """Return the batch's (unweighted) product with parameter-shaped ``vec``."""
        raise NotImplementedError

    # ---- public -------------------------------------------------------------
    def __matmul__(self, v: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """Multiply the operator onto ``v``.

        Args:
            v: A flat tensor ``[D]``, a matrix ``[D, k]`` or a list of tensors
                shaped like ``params``.

        Returns:
            The product in the format, dtype and device of ``v``; computed in
            the parameters' dtype per batch and summed in float64.

        Raises:
            TypeError: If ``v`` is neither a tensor nor a list of tensors, or
                not floating-point (an integer result would be truncated).
            ValueError: If the shapes do not match the parameters, ``v`` or the
                product is not finite, or the model changed (see class doc).

        """
        if isinstance(v, list | tuple):
            if len(v) != len(self.params) or any(
                not isinstance(t, Tensor) or t.shape != p.shape
                for t, p in zip(v, self.params)
            ):
                raise ValueError("v must hold one tensor shaped like each parameter.")
            for t in v:
                check_floating(t)
            flat = torch.cat([t.reshape(-1) for t in v]).unsqueeze(1)
            out = self.matmat(flat)[:, 0]
            return [o.view_as(t).to(t) for o, t in zip(out.split(self._sizes), v)]
        if not isinstance(v, Tensor):
            raise TypeError(f"v must be a tensor or list of tensors, got {type(v)}.")
        if v.ndim not in (1, 2) or v.shape[0] != self.shape[0]:
            raise ValueError(
                f"v must have shape [{self.shape[0]}] or [{self.shape[0]}, k], "
                f"got {tuple(v.shape)}."
            )
        mat = v if v.ndim == 2 else v.unsqueeze(1)
        out = self.matmat(mat).to(device=v.device, dtype=v.dtype)
        return out if v.ndim == 2 else out[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        """Return the float64 product with ``V`` of shape ``[D, k]``.

        Args:
            V: Matrix ``[D, k]`` of any floating dtype and device.

        Returns:
            ``[D, k]`` float64 tensor on the parameters' device.

        Raises:
            TypeError: If ``V`` is not a floating-point tensor.
            ValueError: If ``V`` or the product is not finite, or the model
                changed (see the class docstring).

        """
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a tensor, got {type(V).__name__}.")
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"V must be a tensor of shape [{self.shape[0]}, k].")
        check_floating(V)
        result = self._matmat(V, use_cache=True)
        self.num_products += V.shape[1]
        return result

    def to_scipy(self) -> LinearOperator:
        """Return a float64 ``scipy.sparse.linalg.LinearOperator`` view.

        Each scipy product is counted in ``num_products``.
        """

        def matmat(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            mat = torch.from_numpy(x.reshape(x.shape[0], -1))
            return self.matmat(mat).cpu().numpy()

        def matvec(x: np.ndarray) -> np.ndarray:
            return matmat(np.asarray(x).reshape(-1, 1))[:, 0]

        return LinearOperator(
            self.shape,
            matvec=matvec,
            rmatvec=matvec,
            matmat=matmat,
            rmatmat=matmat,
            dtype=np.float64,
        )

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors (or ``[k, *shape]``) to ``[D(, k)]``."""
        batched = tensors[0].dim() == self.params[0].dim() + 1
        if batched:
            return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], 1).T
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split ``[D]`` into parameter shapes, or ``[D, k]`` into ``[k, *shape]``."""
        chunks = flat.split(self._sizes)
        if flat.ndim == 1:
            return [c.reshape(p.shape) for c, p in zip(chunks, self.params)]
        return [c.T.reshape(-1, *p.shape) for c, p in zip(chunks, self.params)]

    def clear_cache(self) -> None:
        """Drop the cached graphs (they are rebuilt on the next product)."""
        self._cache = None
        self._guard.drop_snapshot()

    # ---- internals ----------------------------------------------------------
    def _states(self) -> Iterator[tuple[Any, float]]:
        """Yield ``(state, weight)`` of every batch that enters the loss."""
        for X, y in self._data:
            size = self._batch_size(X, y)
            weight = self._batch_weight(y, size) if size else 0.0
            if weight == 0.0:  # empty or fully ignored batch: no contribution
                continue
            X, y = self._to_device(X, y)
            yield self._build(X, y), weight

    def _rebuild_cache(self) -> None:
        """Build every batch's graph anew and snapshot the parameters."""
        self.clear_cache()
        self._guard.check_finite()
        with torch.enable_grad(), quiet_backward_hook_warning():
            self._cache = list(self._states())
        self._guard.take_snapshot()
        self._cache_versions = self._data_key()[1]

    def _product(self, V: Tensor, cached: bool) -> Tensor:
        """Sum the weighted batch products with ``V`` [D, k] (and over ranks)."""
        dim, k = self.shape[0], V.shape[1]
        rows = V.T.to(device=self.device, dtype=self.dtype).contiguous()  # [k, D]
        cols = [
            [c.view_as(p) for c, p in zip(row.split(self._sizes), self.params)]
            for row in rows
        ]
        result = torch.zeros(dim, k, dtype=torch.float64, device=self.device)
        with torch.enable_grad(), quiet_backward_hook_warning():
            batches = self._cache if cached else self._states()
            if self._progressbar:
                from tqdm.auto import tqdm

                batches = tqdm(batches, desc=type(self).__name__, leave=False)
            for state, weight in batches:
                for j, col in enumerate(cols):
                    out = self._apply(state, col, retain=cached or j < k - 1)
                    flat = torch.cat([o.reshape(-1) for o in out])
                    result[:, j].add_(flat, alpha=weight)
        if self._distributed:
            allreduce.all_reduce_sum(result, self._group, self._timeout)
        return result

    def _matmat(self, V: Tensor, use_cache: bool) -> Tensor:
        """Checked product; one device synchronisation for all value checks.

        A cached graph is used speculatively while the snapshot comparison is
        pending, and the product is recomputed if it turns out stale (except
        with several ranks, where all must agree before the collective).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Curvature products need autograd, which torch.inference_mode() "
                "disables: compute them outside inference_mode (no_grad is fine)."
            )
        self._guard.check()
        cached = self._cache_graph and use_cache
        data_changed = self._data_changed()
        stale: bool | Tensor = cached and (
            self._cache is None or data_changed or self._guard.stale()
        )
        if cached and self._distributed and not isinstance(stale, bool):
            stale = resolve_flags([stale])[0]
        if stale is True:
            self._rebuild_cache()
            stale = False
        result = self._product(V, cached)
        flags = [stale, nonfinite_flag(V), nonfinite_flag(result)]
        if not cached:  # values not covered by a snapshot
            flags.append(self._guard.nonfinite())
        stale, bad_v, bad_result, *bad_params = resolve_flags(flags)
        if stale:
            self._rebuild_cache()
            result = self._product(V, cached)
            bad_result = resolve_flags([nonfinite_flag(result)])[0]
        if bad_v:
            check_finite(V, "v", "Pass a finite vector.")
        if any(bad_params) or bad_result:
            self._guard.check_finite()
        if bad_result:
            ranks = (
                " (on this rank; check the other ranks')" if self._distributed else ""
            )
            check_finite(
                result,
                f"The {type(self).__name__} product",
                f"Parameters, data and v are finite{ranks}, so the loss or its "
                "derivatives overflow at these parameters (in float32: try "
                "model.double()), or the model's forward is not finite on this data.",
            )
        return result

    def _check_deterministic(self) -> None:
        gen = torch.Generator().manual_seed(1234)
        v = torch.randn(self.shape[0], 1, generator=gen, dtype=torch.float64)
        first = self._matmat(v, use_cache=False)
        second = self._matmat(v, use_cache=False)
        diff = (first - second).norm().item()
        scale = max(first.norm().item(), second.norm().item(), 1e-30)
        rtol = 1e-10 if self.dtype == torch.float64 else 1e-4
        if diff > rtol * scale:
            raise ValueError(
                f"{type(self).__name__} is not deterministic: two products of the "
                f"same vector differ (relative difference {diff / scale:.2e}). "
                "Usual causes: dropout active or batch norm in train mode (call "
                "model.eval()), a shuffling loader or random data augmentation "
                "(use shuffle=False and fixed transforms). Pass "
                "check_deterministic=False to skip this check."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(D={self.shape[0]}, N={self.num_data}, "
            f"reduction={self._reduction!r}, num_products={self.num_products})"
        )
