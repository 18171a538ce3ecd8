"""``LowRankGGN``: the GGN's low-rank factor, collected in one backward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from backpack.utils.module_classification import is_loss
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm

from vivitlib import _checks
from vivitlib.block import GGNBlock, GroupAccumulator, Scaling
from vivitlib.extensions import (
    FACTOR_FIELD,
    GRADS_FIELD,
    BatchGradsExtension,
    GGNFactorExtension,
)
from vivitlib.groups import normalize_groups

#: Everything a pass can deliver; ``compute=`` picks a subset.
QUANTITIES = ("eigenvalues", "eigenvectors", "directional_derivatives", "newton_step")
_NEEDS_GRADS = {"directional_derivatives", "newton_step"}
_NEEDS_FACTORS = {"eigenvectors", "newton_step"}
_REDUCTIONS = ("mean", "sum")


class _Pass:
    """Book-keeping of one backward pass: batch facts, accumulators, grad backup."""

    def __init__(self, loss_module: Module, groups: list[dict[str, Any]], keep: bool):
        self.loss_output = loss_module.output
        self.batch_size = loss_module.input0.shape[0]
        self.grad_backup = {
            id(p): (p, None if p.grad is None else p.grad.detach().clone())
            for group in groups
            for p in group["params"]
        }
        self.accumulators = [GroupAccumulator(g["params"], keep) for g in groups]
        self.finished = False

    def restore_grads(self) -> None:
        """Put every ``.grad`` back as it was before the pass."""
        for p, grad in self.grad_backup.values():
            p.grad = grad


class LowRankGGN:
    """The GGN ``G = V Vᵀ`` per parameter group, from one backward pass.

    Inside ``with backpack(*ggn.extensions, extension_hook=ggn.hook)`` the
    backward pass computes, layer by layer, each layer's share of the Gram
    matrix ``VᵀV``, of ``Vᵀ g_n`` and of the gradient, then frees the layer's
    buffers. Afterwards ``ggn.blocks`` holds one :class:`~vivitlib.block.GGNBlock`
    per group with eigenvalues, lifted eigenvectors, per-sample directional
    derivatives and Newton steps. ``.grad`` is filled exactly as by a plain
    backward pass.

    Conventions: per-sample gradients ``g_n`` and per-sample GGNs ``G_n`` are
    scaled so that their mean over samples is the gradient and GGN of the loss
    as the user reduced it (``'mean'`` or ``'sum'``). With ``subsampling`` the
    curvature is ``(N/|S|)·Σ_{n∈S} G_n / N``: for ``'mean'`` exactly the GGN of
    the subset's mean loss.

    Args:
        params: Parameters (one group), or a list of ``{"params": [...]}`` dicts
            (one block each), e.g. :func:`vivitlib.layerwise_groups`.
        mc_samples: ``0`` for the exact loss-Hessian factor (``C`` columns per
            sample), ``m > 0`` for ``m`` Monte-Carlo samples (``m`` columns).
        subsampling: Indices of the samples used for curvature (default all).
        grad_subsampling: Indices of the samples used for per-sample gradients
            (default all); may differ from ``subsampling``.
        compute: Subset of ``("eigenvalues", "eigenvectors",
            "directional_derivatives", "newton_step")``; default all. Eigenvalues
            alone skip per-sample gradients and free every factor at once.
        eigh_dtype: Precision of the Gram eigen-decomposition (default float64;
            float32 is faster for large Gram matrices).
        rtol: Eigenvalues ``≤ rtol · λ_max`` are dropped as zero; default
            ``N_c·C·ε`` of the model's dtype (see :func:`vivitlib.linalg.default_rtol`).

    Raises:
        TypeError, ValueError: On malformed groups, indices or options.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        mc_samples: int = 0,
        subsampling: Sequence[int] | Tensor | None = None,
        grad_subsampling: Sequence[int] | Tensor | None = None,
        compute: Sequence[str] = QUANTITIES,
        eigh_dtype: torch.dtype = torch.float64,
        rtol: float | None = None,
    ):
        self.param_groups = normalize_groups(params)
        self.mc_samples = _checks.check_positive_int(
            mc_samples, "mc_samples", allow_zero=True
        )
        self.subsampling = _checks.check_indices(subsampling, "subsampling")
        self.grad_subsampling = _checks.check_indices(
            grad_subsampling, "grad_subsampling"
        )
        self.compute = _check_compute(compute)
        if eigh_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"eigh_dtype must be float32 or float64, got {eigh_dtype}."
            )
        self.eigh_dtype = eigh_dtype
        self.rtol = rtol
        self._param_group = {
            id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]
        }
        exts: list = [GGNFactorExtension(self, self.mc_samples, self.subsampling)]
        if self._needs_grads:
            exts.append(BatchGradsExtension(self, self.grad_subsampling))
        self._extensions = tuple(exts)
        self._pass: _Pass | None = None
        self._blocks: list[GGNBlock] | None = None

    @property
    def extensions(self) -> tuple:
        """BackPACK extensions to pass to ``backpack(...)``."""
        return self._extensions

    @property
    def _needs_grads(self) -> bool:
        return bool(_NEEDS_GRADS & set(self.compute))

    @property
    def _keeps_factors(self) -> bool:
        return bool(_NEEDS_FACTORS & set(self.compute))

    @property
    def blocks(self) -> list[GGNBlock]:
        """One result block per parameter group, from the latest backward pass.

        Raises:
            RuntimeError: If no complete pass has been collected.
        """
        if self._blocks is None:
            self._blocks = self._finish_pass()
        return self._blocks

    def reset(self) -> None:
        """Drop the latest pass's results and buffers."""
        if self._pass is not None:
            _clear_fields(self.param_groups)
        self._pass, self._blocks = None, None

    # -- called by BackPACK -------------------------------------------------

    def run_extension(
        self, call: Callable[..., None], module: Module, g_inp: Any, g_out: Any
    ) -> None:
        """Validate ``module``, run one of this object's extensions on it.

        On any failure, ``.grad`` of every grouped parameter is restored to its
        value before the pass and partial buffers are dropped.
        """
        try:
            if is_loss(module):
                self._begin_pass(module, g_out)
            else:
                _check_module(module)
            call(module, g_inp, g_out)
        except Exception as err:
            self._abort()
            raise _explain(err, module) from err

    def hook(self, module: Module) -> None:
        """Extension hook: contract ``module``'s buffers into the groups, free them."""
        if self._pass is None or self._pass.finished or is_loss(module):
            return
        try:
            for param in module.parameters(recurse=False):
                self._collect(param)
        except Exception:
            self._abort()
            raise

    # -- internals ----------------------------------------------------------

    def _begin_pass(self, loss_module: Module, g_out: Any) -> None:
        if self._pass is not None and self._pass.loss_output is loss_module.output:
            return  # a second extension on the same loss
        self.reset()
        reduction = getattr(loss_module, "reduction", None)
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"{type(loss_module).__name__}(reduction={reduction!r}) is not "
                "supported; use reduction='mean' or 'sum'."
            )
        _checks.check_finite(
            loss_module.input0,
            "The model output",
            "Check the inputs and parameters for NaN/Inf.",
        )
        _checks.check_finite(
            loss_module.output, "The loss", "Check the targets for NaN/Inf."
        )
        if not torch.allclose(g_out[0], torch.ones_like(g_out[0])):
            raise ValueError(
                "The loss module must be the last operation before backward(), but "
                f"its output received gradient {g_out[0].flatten()[:1].item():g}. "
                "Call backward() on the loss module's output directly (no scaling "
                "or sums after it)."
            )
        batch_size = loss_module.input0.shape[0]
        _checks.check_indices_in_range(self.subsampling, batch_size, "subsampling")
        _checks.check_indices_in_range(
            self.grad_subsampling, batch_size, "grad_subsampling"
        )
        self._pass = _Pass(loss_module, self.param_groups, self._keeps_factors)

    def _collect(self, param: Tensor) -> None:
        factor = param.__dict__.pop(FACTOR_FIELD, None)
        grads = param.__dict__.pop(GRADS_FIELD, None)
        group = self._param_group.get(id(param))
        if group is None or factor is None:
            return
        if self._needs_grads and grads is None:
            raise RuntimeError("Per-sample gradients are missing for a parameter.")
        self._pass.accumulators[group].add(param, factor, grads)

    def _abort(self) -> None:
        if self._pass is not None:
            self._pass.restore_grads()
        _clear_fields(self.param_groups)
        self._pass, self._blocks = None, None

    def _finish_pass(self) -> list[GGNBlock]:
        if self._pass is None:
            raise RuntimeError(
                f"No curvature has been collected. {_checks._NO_PASS_HINT}"
            )
        leftovers = _clear_fields(self.param_groups)
        if leftovers:
            raise RuntimeError(
                "Buffers were computed but never collected: pass "
                "`extension_hook=ggn.hook` to `backpack(...)`."
            )
        for index, acc in enumerate(self._pass.accumulators):
            missing = acc.missing()
            if missing:
                shapes = [tuple(p.shape) for p in missing]
                raise RuntimeError(
                    f"Group {index}: parameters of shapes {shapes} received no GGN "
                    "factor. Extend every module that owns them with "
                    "backpack.extend(model) (or extend(model, use_converter=True) "
                    "for residual nets) and keep them in the forward pass."
                )
        self._pass.finished = True
        n = self._pass.batch_size
        scaling = Scaling(
            batch_size=n,
            num_curv=n if self.subsampling is None else len(self.subsampling),
            num_grad=n if self.grad_subsampling is None else len(self.grad_subsampling),
        )
        return [
            GGNBlock(
                acc,
                scaling,
                rtol=self.rtol,
                eigh_dtype=self.eigh_dtype,
                has_grads=self._needs_grads,
            )
            for acc in self._pass.accumulators
        ]


def _check_compute(compute: Sequence[str]) -> tuple[str, ...]:
    if isinstance(compute, str):
        compute = (compute,)
    unknown = set(compute) - set(QUANTITIES)
    if unknown or not compute:
        raise ValueError(
            f"compute must be a non-empty subset of {QUANTITIES}, got {tuple(compute)}."
        )
    return tuple(compute)


def _check_module(module: Module) -> None:
    if isinstance(module, _BatchNorm) and module.training:
        raise ValueError(
            f"{module} is in train mode: batch statistics couple the samples, so "
            "per-sample curvature is undefined. Call model.eval() before the "
            "curvature pass."
        )


def _clear_fields(groups: list[dict[str, Any]]) -> bool:
    """Delete leftover buffers from grouped parameters; return whether any existed."""
    found = False
    for group in groups:
        for p in group["params"]:
            for name in (FACTOR_FIELD, GRADS_FIELD):
                if name in p.__dict__:
                    del p.__dict__[name]
                    found = True
    return found


def _explain(err: Exception, module: Module) -> Exception:
    """Translate BackPACK's terse errors into messages naming the fix."""
    text = str(err)
    name = type(module).__name__
    if isinstance(err, NotImplementedError) and "does not have an extension" in text:
        return NotImplementedError(
            f"{name} is not supported: BackPACK has no square-root GGN rule for it. "
            "Replace the layer by a supported one (Linear, Conv1d/2d/3d, "
            "ConvTranspose, activations, pooling, Flatten, Dropout, eval-mode "
            "BatchNorm, ...) or, for residual/functional code, try "
            "extend(model, use_converter=True)."
        )
    if isinstance(err, AssertionError) and "backpropagation quantity" in text:
        return RuntimeError(
            f"BackPACK reached {name} without a curvature signal from the loss: "
            "extend the loss function too (loss_fn = backpack.extend(loss_fn)), and "
            "make the loss module the last operation of the forward pass."
        )
    return err
