"""Shared machinery of every object that collects curvature in a BackPACK pass.

A collector owns parameter groups and BackPACK extensions, validates the pass
at the loss module (reduction, NaN/Inf, index ranges, loss as last operation),
hands each module's buffers to per-group accumulators as BackPACK reaches it,
and on any failure restores ``.grad`` and drops partial buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from backpack.utils.module_classification import is_loss
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm

from vivitlib import _checks
from vivitlib._warnings import BACKWARD_HOOK_WARNING
from vivitlib.accumulator import Scaling
from vivitlib.curvature_pass import CurvaturePass
from vivitlib.distributed import FactorExchange, resolve_group, select_samples
from vivitlib.errors import (
    IncompletePassError,
    NoPassError,
    StalePassWarning,
    UnsupportedError,
)
from vivitlib.extensions import (
    FACTOR_FIELD,
    GRADS_FIELD,
    BatchGradsExtension,
    GGNFactorExtension,
)
from vivitlib.extensions.losses import cross_entropy_column_basis, loss_weighting
from vivitlib.factors import as_factor, as_grads
from vivitlib.groups import normalize_groups
from vivitlib.memory import MemoryBudget, memory_budget, parse_memory

_REDUCTIONS = ("mean", "sum")
_INSTANCE_TAGS = itertools.count()


class _WeakOwner:
    """A collector as the owner of its own extensions, by weak reference.

    The collector holds its extensions; were they to hold it too, a collector
    dropped after a pass (one made per training step) would keep its Gram,
    blocks and kept factors until Python's cycle collector ran.
    """

    def __init__(self, collector: BackpackCollector):
        self._collector = weakref.ref(collector)

    def run_extension(self, call: Callable, module: Module, g_inp, g_out) -> None:
        """The collector's :meth:`BackpackCollector.run_extension`."""
        collector = self._collector()
        if collector is None:
            raise RuntimeError(
                "The collector (LowRankGGN, DirectionalDerivatives or optimiser) "
                "these BackPACK extensions belong to was deleted before the "
                "backward pass. Keep a reference to it for the pass: "
                "ggn = LowRankGGN(...); with backpack(*ggn.extensions, "
                "extension_hook=ggn.hook): loss.backward()."
            )
        collector.run_extension(call, module, g_inp, g_out)


class BackpackCollector:
    """Base of :class:`~vivitlib.LowRankGGN` and friends: one BackPACK pass, validated.

    Subclasses provide ``_new_accumulators()`` (one object per group with
    ``add(param, factor, grads)`` and ``missing()``) and read the accumulators
    after :meth:`_finish_pass`.

    Args:
        params: Parameters (one group) or a list of ``{"params": [...]}`` dicts.
        mc_samples: ``0`` exact loss-Hessian factor, ``m > 0`` Monte-Carlo samples.
        subsampling: Curvature sample indices (``None``: all), or a rule
            ``rule(batch_size, outputs) -> indices | None`` called at the start of
            every pass with the batch size and the number of model outputs per
            sample (one process only).
        grad_subsampling: Per-sample-gradient indices (``None``: all).
        needs_grads: Whether per-sample gradients are collected.
        max_memory: Working-memory budget of the pass in bytes, or a string
            such as ``"512MiB"`` (``None``: the defaults); see
            :mod:`vivitlib.memory`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        mc_samples: int = 0,
        subsampling: Sequence[int] | Tensor | Callable | None = None,
        grad_subsampling: Sequence[int] | Tensor | None = None,
        needs_grads: bool = True,
        process_group: Any = None,
        generator: torch.Generator | None = None,
        max_memory: int | str | None = None,
    ):
        self.max_memory = parse_memory(max_memory)
        self._budget = MemoryBudget.split(self.max_memory)
        self._itemsize = 4
        self.param_groups = normalize_groups(params)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {generator!r}."
            )
        self.generator = generator
        self._subsampling_rule = subsampling if callable(subsampling) else None
        if self._subsampling_rule is not None:
            if process_group is not None and process_group is not False:
                raise ValueError(
                    "A sub-sampling rule needs the local batch; with process_group "
                    "pass global indices (or None)."
                )
            subsampling = None
        self.process_group = resolve_group(process_group)
        self.mc_samples = _checks.check_int_at_least(mc_samples, "mc_samples", 0)
        self.subsampling = _checks.check_indices(subsampling, "subsampling")
        self.grad_subsampling = _checks.check_indices(
            grad_subsampling, "grad_subsampling"
        )
        self._needs_grads = needs_grads
        self._param_group = {
            id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]
        }
        tag = next(_INSTANCE_TAGS)
        self._fields = (f"{FACTOR_FIELD}_{tag}", f"{GRADS_FIELD}_{tag}")
        # across processes, indices are global: every rank computes all of its
        # columns and the chosen ones are selected after the exchange
        local = self.process_group is None
        factor_field, grads_field = self._fields  # private: passes can be shared
        owner = _WeakOwner(self)
        exts: list = [
            GGNFactorExtension(
                owner,
                self.mc_samples,
                self.subsampling if local else None,
                savefield=factor_field,
                params=self.params,
                deflate=self.deflates,
            )
        ]
        if needs_grads:
            exts.append(
                BatchGradsExtension(
                    owner,
                    self.grad_subsampling if local else None,
                    savefield=grads_field,
                )
            )
            exts[0].grads_partner = exts[1]
        self._extensions = tuple(exts)
        self._pass: CurvaturePass | None = None

    @property
    def params(self) -> list[Tensor]:
        """Every parameter of every group, in group order."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def extensions(self) -> tuple:
        """BackPACK extensions to pass to ``backpack(...)``."""
        return self._extensions

    @property
    def current_pass(self) -> CurvaturePass | None:
        """The latest pass (``None`` before the first or after :meth:`reset`).

        Its ``backward_done``, ``finished`` and ``stale`` flags show where it
        stands: started when BackPACK reached the loss module, backward done
        when autograd finished, finished when the results were first read.
        """
        return self._pass

    @property
    def savefields(self) -> tuple[str, str]:
        """Private attribute names of this object's factor and gradient buffers."""
        return self._fields

    @property
    def deflates(self) -> bool:
        """Whether an exact cross-entropy factor has ``C - 1`` columns per sample.

        One process and the exact factor only; see
        :func:`~vivitlib.extensions.losses.cross_entropy_column_basis`.
        """
        return self.mc_samples == 0 and self.process_group is None

    @property
    def needs_grads(self) -> bool:
        """Whether this object collects per-sample gradients."""
        return self._needs_grads

    def reset(self) -> None:
        """Drop the latest pass's results and buffers."""
        if self._pass is not None:
            _clear_fields(self.param_groups, self._fields)
            self._pass.release()  # stop watching for later backward passes
            if not self._pass.backward_done:  # its backward never finished
                _release_warning_filter(self._pass)
        self._pass = None
        self._on_reset()

    def _on_reset(self) -> None:
        """Drop results derived from the latest pass (subclass hook)."""

    def _new_accumulators(self) -> list:
        raise NotImplementedError

    # -- called by BackPACK -------------------------------------------------

    def run_extension(
        self, call: Callable[..., None], module: Module, g_inp: Any, g_out: Any
    ) -> None:
        """Validate ``module``, run one of this object's extensions on it.

        On any failure, ``.grad`` of every grouped parameter is restored to its
        value before the pass and partial buffers are dropped.
        """
        try:
            self.enter_module(module, g_out)
            with self.random_state(module), self.memory_scope():
                call(module, g_inp, g_out)
        except Exception:
            self._abort()
            raise

    def memory_scope(self) -> contextlib.AbstractContextManager:
        """Apply this object's memory budget (``max_memory``) inside a block."""
        return memory_budget(self._budget, self._itemsize)

    def random_state(self, module: Module) -> contextlib.AbstractContextManager:
        """Where Monte-Carlo draws at the loss come from.

        With a ``generator``, BackPACK's draws at the loss module run on torch's
        global generator forked and seeded from it (so the caller's global random
        state is untouched and results are reproducible); otherwise on torch's
        global generator as it is.
        """
        if self.generator is None or self.mc_samples == 0 or not is_loss(module):
            return contextlib.nullcontext()
        return _seeded_from(self.generator, module.input0.device)

    def enter_module(self, module: Module, g_out: Any) -> None:
        """Validate ``module`` before an extension runs on it; start a pass at the loss.

        Raises:
            RuntimeError, ValueError: If the module or the pass is invalid (the
                caller rolls back with :meth:`abort`).
        """
        if not hasattr(module, "output"):
            raise RuntimeError(_missing_io_message(module))
        if is_loss(module):
            self._begin_pass(module, g_out)
        else:
            _check_module(module)

    def abort(self) -> None:
        """Restore ``.grad`` and drop the partial pass (after a failure)."""
        self._abort()

    def share_settings(self) -> tuple | None:
        """What two collectors must agree on to share one factor backpropagation.

        ``None``: this collector cannot share (its curvature samples are chosen
        per pass by a rule).
        """
        if self._subsampling_rule is not None:
            return None
        sub = None if self.subsampling is None else tuple(self.subsampling)
        return (self.mc_samples, sub, self.process_group is None)

    def hook(self, module: Module) -> None:
        """Extension hook: contract ``module``'s buffers into the groups, free them."""
        if self._pass is None or self._pass.finished or is_loss(module):
            return
        try:
            with self.memory_scope():
                for param in module.parameters(recurse=False):
                    self._collect(param)
        except Exception:
            self._abort()
            raise

    # -- internals ----------------------------------------------------------

    def _begin_pass(self, loss_module: Module, g_out: Any) -> None:
        current = self._pass
        if (
            current is not None
            and current.loss_output is loss_module.output
            and not current.backward_done
        ):
            return  # a second extension of this collector on the same loss
        self.reset()
        reduction = getattr(loss_module, "reduction", None)
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"{type(loss_module).__name__}(reduction={reduction!r}) is not "
                "supported; use reduction='mean' or 'sum'."
            )
        batch_size = loss_module.input0.shape[0]
        self._itemsize = loss_module.input0.element_size()
        if batch_size == 0 or loss_module.input0.numel() == 0:
            raise ValueError(
                "The mini-batch is empty (model output of shape "
                f"{tuple(loss_module.input0.shape)}); pass at least one sample."
            )
        for p in self.params:
            if not p.requires_grad:
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} was frozen "
                    "(requires_grad=False) after this object was built; frozen "
                    "parameters are skipped only at construction. Build a new "
                    "one (or unfreeze the parameter)."
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
        weighting = loss_weighting(loss_module)
        exchange = None
        if self.process_group is not None:
            exchange = FactorExchange.start(self.process_group, weighting, reduction)
            weighting, batch_size = exchange.weighting, exchange.batch_size
        if self._subsampling_rule is not None:
            self._apply_subsampling_rule(loss_module.input0)
        _checks.check_indices_in_range(self.subsampling, batch_size, "subsampling")
        _checks.check_indices_in_range(
            self.grad_subsampling, batch_size, "grad_subsampling"
        )
        self._pass = CurvaturePass(
            loss_module,
            self.param_groups,
            self._new_accumulators(),
            weighting,
            exchange,
        )
        if self.deflates:
            self._pass.column_basis = cross_entropy_column_basis(
                loss_module, self.subsampling
            )
        _quiet_backward_hook_warning(self._pass, self._end_of_backward)

    def _apply_subsampling_rule(self, output: Tensor) -> None:
        """Choose this pass's curvature samples with the rule (before BackPACK does)."""
        chosen = self._subsampling_rule(output.shape[0], output[0].numel())
        self.subsampling = _checks.check_indices(
            chosen, "subsampling (returned by the rule)"
        )
        self._extensions[0].set_subsampling(self.subsampling)

    def _collect(self, param: Tensor) -> None:
        factor = param.__dict__.pop(self._fields[0], None)
        grads = param.__dict__.pop(self._fields[1], None)
        group = self._param_group.get(id(param))
        if group is None or factor is None:
            return
        if self._needs_grads and grads is None:
            raise RuntimeError("Per-sample gradients are missing for a parameter.")
        exchange = self._pass.exchange
        if exchange is not None:
            factor, grads = exchange.exchange(param, as_factor(factor), as_grads(grads))
            factor, grads = select_samples(
                factor, grads, self.subsampling, self.grad_subsampling
            )
        accumulator = self._pass.accumulators[group]
        if id(param) in accumulator.visited and not self._sums_shared_params:
            raise UnsupportedError(
                f"A parameter of shape {tuple(param.shape)} is used by two modules "
                "(tied weights). Its GGN factor is the sum of both modules' "
                "factors, which this object does not form. Untie the weights, or "
                "leave the shared parameter out of the groups (e.g. freeze it)."
            )
        accumulator.add(param, factor, grads)

    @property
    def communication(self) -> list:
        """Per-parameter bytes this rank sent in the latest pass (across processes).

        A list of :class:`vivitlib.distributed.LayerTraffic`; empty for a single
        process.
        """
        exchange = None if self._pass is None else self._pass.exchange
        return [] if exchange is None else list(exchange.traffic)

    def _end_of_backward(self, pass_: CurvaturePass) -> None:
        """Called when the backward that ran ``pass_`` ends; checks, rolls back."""
        if self._pass is not pass_:
            return
        try:
            self._check_backward(pass_)
        except Exception:
            self._abort()
            raise

    def _check_backward(self, pass_: CurvaturePass) -> None:
        """Checks that need the finished backward (subclass hook)."""

    #: Whether accumulators add a parameter's contributions from several modules
    #: correctly (projections are linear in V; Gram matrices are not).
    _sums_shared_params = False

    def _abort(self) -> None:
        if self._pass is not None:
            self._pass.restore_grads()
            self._pass.release()
            _release_warning_filter(self._pass)
        _clear_fields(self.param_groups, self._fields)
        self._pass = None
        self._on_reset()

    def _finish_pass(self) -> Scaling:
        """Check the pass is complete; return the scaling of its buffers."""
        if self._pass is None:
            raise NoPassError(
                f"No curvature has been collected. {_checks._NO_PASS_HINT}"
            )
        if self._pass.stale:
            warnings.warn(
                "These results describe an earlier curvature pass: a later "
                "backward() ran without this object's extensions, so .grad no "
                "longer matches them. Run the forward and backward pass inside "
                "`with backpack(...)` again for current results.",
                StalePassWarning,
                stacklevel=3,
            )
        leftovers = _clear_fields(self.param_groups, self._fields)
        if leftovers:
            raise IncompletePassError(
                "Buffers were computed but never collected: pass "
                "`extension_hook=ggn.hook` to `backpack(...)`."
            )
        for index, acc in enumerate(self._pass.accumulators):
            missing = acc.missing()
            if missing:
                shapes = [tuple(p.shape) for p in missing]
                raise IncompletePassError(
                    f"Group {index}: parameters of shapes {shapes} received no GGN "
                    "factor. Extend every module that owns them with "
                    "backpack.extend(model) (or extend(model, use_converter=True) "
                    "for residual nets) and keep them in the forward pass."
                )
        self._pass.finished = True
        return Scaling.from_weighting(
            self._pass.weighting, self.subsampling, self.grad_subsampling
        )

    @property
    def is_stale(self) -> bool:
        """Whether a ``backward()`` without this object ran after its latest pass."""
        return self._pass is not None and self._pass.stale


_HOOK_WARNING = BACKWARD_HOOK_WARNING
_quiet_passes: set[int] = set()


def _quiet_backward_hook_warning(
    pass_: CurvaturePass, on_end: Callable[[CurvaturePass], None]
) -> None:
    """Silence torch's 'Full backward hook is firing' warning until the backward ends.

    BackPACK's module hooks make torch warn for the first layer (whose input needs
    no gradient) in every pass; the message is about our machinery, not the
    user's code. The filter matches that message only; it is removed when the
    last pass that needs it ends (a callback at the end of the backward) or is
    aborted.
    """
    if not _quiet_passes:
        warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
    _quiet_passes.add(id(pass_))

    def end() -> None:
        _release_warning_filter(pass_)
        pass_.end_backward()
        on_end(pass_)

    torch.autograd.Variable._execution_engine.queue_callback(end)


def _release_warning_filter(pass_: CurvaturePass) -> None:
    """Drop ``pass_``'s claim on the warning filter; remove it if none is left."""
    _quiet_passes.discard(id(pass_))
    if _quiet_passes:
        return
    for entry in [f for f in warnings.filters if _is_hook_filter(f)]:
        warnings.filters.remove(entry)
    mutated = getattr(warnings, "_filters_mutated", None)  # keep caches right
    if mutated is not None:
        mutated()


def _is_hook_filter(entry: tuple) -> bool:
    message = entry[1]
    return entry[0] == "ignore" and getattr(message, "pattern", None) == _HOOK_WARNING


def _missing_io_message(module: Module) -> str:
    name = type(module).__name__
    return (
        f"{name} holds no stored forward pass. Either it was reached twice in one "
        "backward pass (a module used more than once in the forward pass, i.e. "
        "shared weights, is not supported by BackPACK: use a separate module for "
        "each use), or backward() ran a second time over the same graph: BackPACK "
        "frees each module's inputs after its backward, so for a second "
        "backward(retain_graph=True) use `backpack(..., retain_graph=True)`, or "
        "run a fresh forward pass."
    )


@contextlib.contextmanager
def _seeded_from(generator: torch.Generator, device: torch.device):
    seed = int(torch.randint(2**62, (1,), generator=generator))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_module(module: Module) -> None:
    if isinstance(module, _BatchNorm) and module.training:
        raise ValueError(
            f"{module} is in train mode: batch statistics couple the samples, so "
            "per-sample curvature is undefined. Call model.eval() before the "
            "curvature pass."
        )
    if isinstance(module, _BatchNorm) and (
        module.running_mean is None or module.running_var is None
    ):
        raise ValueError(
            f"{module} keeps no running statistics (track_running_stats=False), "
            "so it normalises with batch statistics even in eval mode: they "
            "couple the samples, and per-sample curvature is undefined. Use "
            "track_running_stats=True (and model.eval()) for the curvature pass."
        )


def _clear_fields(groups: list[dict[str, Any]], fields: tuple[str, str]) -> bool:
    """Delete leftover buffers from grouped parameters; return whether any existed."""
    found = False
    for group in groups:
        for p in group["params"]:
            for name in fields:
                if name in p.__dict__:
                    del p.__dict__[name]
                    found = True
    return found
