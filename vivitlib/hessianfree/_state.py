"""What an operator checks about the model before every product.

Between products a user may switch the model to train mode, freeze a
parameter, convert the model (``model.double()``, ``model.to(...)``), or
change parameter values in ways autograd does not see (``p.data.mul_(...)``
and ``p.data = ...`` bypass the version counter of ``p``). :class:`ModelGuard`
turns the first three into clear errors and detects the last by comparing
the parameters and buffers with a snapshot taken when a graph was cached, so
a cached graph is only reused while it is provably valid. A snapshot costs
one copy of the parameters and buffers (memory) and one equality pass per
product (time; on GPUs without a synchronisation of its own, see
:meth:`ModelGuard.stale`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vivitlib.hessianfree._finite import nonfinite_flag, resolve_flags
from vivitlib.hessianfree._inputs import check_model_state


def _names(model: nn.Module, params: list[Tensor]) -> list[str]:
    named = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [named.get(id(p), f"params[{i}]") for i, p in enumerate(params)]


def _meta(t: Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


class ModelGuard:
    """Checks the model and parameters before each product; validates caches.

    Attributes:
        names: Parameter names as in ``model.named_parameters()``.
    """

    def __init__(self, model: nn.Module, params: list[Tensor]) -> None:
        """Record the parameters' shapes, dtypes and devices.

        Args:
            model: The model.
            params: The parameters the operator differentiates.

        """
        self._model = model
        self._params = params
        self.names = _names(model, params)
        self._meta = [_meta(p) for p in params]
        self._snapshot: list[Tensor] | None = None
        self._in_eval = [(n, m) for n, m in model.named_modules() if not m.training]

    def _watched(self) -> list[Tensor]:
        """Everything a cached graph depends on: all parameters and buffers."""
        return [*self._model.parameters(), *self._model.buffers()]

    def check(self) -> None:
        """Raise if the model or the parameters can no longer give valid products.

        Checks modes, ``requires_grad``, shapes, dtypes and devices (no device
        synchronisation); values are checked by :meth:`stale`,
        :meth:`nonfinite` and :meth:`check_finite`.

        Raises:
            ValueError: If dropout/batch norm (or any module that was in eval
                mode at the build) is in train mode, or a parameter was frozen
                or changed shape, dtype or device since the operator was built.

        """
        check_model_state(self._model, built=True)
        for name, module in self._in_eval:
            if module.training:
                raise ValueError(
                    f"Module {name!r} ({type(module).__name__}) was in eval mode "
                    "when the operator was built and is now in train mode "
                    "(model.train()): its forward may be random (e.g. functional "
                    "dropout). Call model.eval() again before computing products."
                )
        for name, p, meta in zip(self.names, self._params, self._meta):
            if not p.requires_grad:
                raise ValueError(
                    f"Parameter {name!r} was frozen (requires_grad=False) after the "
                    "operator was built. Set requires_grad=True again, or build a "
                    "new operator with params= listing the parameters you want."
                )
            if _meta(p) != meta:
                raise ValueError(
                    f"Parameter {name!r} changed from (shape, dtype, device) {meta} "
                    f"to {_meta(p)} since the operator was built (e.g. by "
                    "model.double() or model.to(...)). Build a new operator."
                )

    def nonfinite(self) -> Tensor:
        """A 0-d bool tensor, ``True`` if a parameter holds NaN or Inf (no sync)."""
        with torch.no_grad():
            sums = [nonfinite_flag(p).to(self._params[0].device) for p in self._params]
            return torch.stack(sums).any()

    def check_finite(self) -> None:
        """Raise a ``ValueError`` naming the parameters that hold NaN or Inf."""
        if not resolve_flags([self.nonfinite()])[0]:
            return
        bad = [
            n for n, p in zip(self.names, self._params) if not torch.isfinite(p).all()
        ]
        if not bad:  # only the float64 sum overflowed
            return
        raise ValueError(
            f"Parameter(s) {bad} contain NaN or Inf, where the curvature is "
            "undefined. Restore finite values (e.g. from a checkpoint, or train "
            "with a smaller learning rate) before computing products."
        )

    def take_snapshot(self) -> None:
        """Copy the parameters and buffers a cached graph is built with."""
        self._snapshot = [t.detach().clone() for t in self._watched()]  # memory

    def drop_snapshot(self) -> None:
        """Forget the snapshot (the cache was cleared)."""
        self._snapshot = None

    def stale(self) -> bool | Tensor:
        """Whether parameters or buffers differ from the snapshot.

        Returns:
            ``True`` without a snapshot or when a shape, dtype or device
            changed; else a Python bool (CPU) or a 0-d bool tensor (other
            devices, so that the caller synchronises once for all checks).
        """
        if self._snapshot is None:
            return True
        current = self._watched()
        if len(current) != len(self._snapshot) or any(
            _meta(a) != _meta(b) for a, b in zip(current, self._snapshot)
        ):
            return True
        with torch.no_grad():
            if all(t.device.type == "cpu" for t in current):
                return not all(
                    torch.equal(a, b) for a, b in zip(current, self._snapshot)
                )
            device = current[0].device
            flags = [(a != b).any().to(device) for a, b in zip(current, self._snapshot)]
            return torch.stack(flags).any()
