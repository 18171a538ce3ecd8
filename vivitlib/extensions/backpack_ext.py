"""BackPACK extensions that collect factored ``V`` and per-sample gradients.

Both subclass BackPACK's own (``SqrtGGN`` and ``BatchGrad``), swap in factored
handlers for linear and convolution weights (and, for the factor, the faster
backpropagation rules of :mod:`.fast_backprop`), save under private attribute
names, and report every module they reach to their owner so it can validate
the pass and roll back on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from backpack.extensions import BatchGrad
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from backpack.utils.module_classification import is_loss
from torch import Tensor
from torch.nn import Module

from vivitlib.errors import DisconnectedLossError, UnsupportedError
from vivitlib.extensions.batch_norm import BATCH_NORM_SQRT
from vivitlib.extensions.extra_layers import EXTRA_SQRT
from vivitlib.extensions.fast_backprop import FAST_SQRT, lazy_backpropagate
from vivitlib.extensions.layers import (
    FACTORED_LAYERS,
    conv_input_blocks,
    conv_unfoldable,
    drop_handed_over,
    handing_over_inputs,
)
from vivitlib.extensions.lazy import LazyColumns, StepResults
from vivitlib.extensions.lazy_layers import (
    channel_step,
    conv_step,
    lazy_plan,
    sample_step,
)
from vivitlib.extensions.ledger import QuantityLedger
from vivitlib.extensions.pool_indices import PoolingIndices
from vivitlib.extensions.reach import RemainingParams
from vivitlib.memory import current_budget

FACTOR_FIELD = "_vivitlib_ggn_factor"
GRADS_FIELD = "_vivitlib_batch_grads"


class PassOwner(Protocol):
    """What the extensions need from the object collecting their results."""

    def run_extension(
        self, call: Callable[..., None], module: Module, g_inp: Any, g_out: Any
    ) -> None:
        """Validate ``module``, run ``call``, roll back on failure."""


def _factored_sqrt(base: type, build: Callable, derivatives: type | None) -> type:
    """BackPACK's factor handler ``base``; the weight's factor from ``build``.

    With ``derivatives`` that keep factors lazy (convolutions), a lazy factor
    reaching the layer is handled column chunk by column chunk
    (:mod:`.lazy_layers`), and a large factor backpropagated to the input stays
    lazy. Derivatives with ``takes_lazy = False`` (linear layers) only do the
    latter: a lazy factor reaching the layer is formed first.
    """
    lazy_aware = derivatives is not None and hasattr(derivatives, "column_op")
    takes_lazy = lazy_aware and getattr(derivatives, "takes_lazy", True)

    class _FactoredSqrt(base):
        def __init__(self):
            super().__init__()
            if derivatives is not None:
                self.derivatives = derivatives()
            self._dense_bias = self._make_param_function("bias")
            self._chunked = StepResults()

        def accepts_lazy(self, ext, module, quantity: LazyColumns) -> bool:
            """Whether this step handles ``quantity`` in chunks (:func:`lazy_plan`)."""
            if not takes_lazy:
                return False
            plan = lazy_plan(module, quantity, conv_unfoldable(module), _wants(ext))
            return plan is not None

        def _from_chunks(self, ext, module, backproped, name: str):
            """Result ``name`` of the step on ``backproped`` (computed on first ask)."""

            def compute() -> dict[str, Any]:
                sub = ext.get_subsampling()
                unfoldable = conv_unfoldable(module)
                wants = _wants(ext)
                # only the weight's factor reads the unfolded input
                unfolded = (
                    conv_input_blocks(module, sub)
                    if unfoldable and wants(module.weight)
                    else None
                )
                plan = lazy_plan(module, backproped, unfoldable, wants)
                steps = {"channels": channel_step, "samples": sample_step}
                step = steps.get(plan, conv_step)
                return step(self.derivatives, module, backproped, sub, unfolded, wants)

            return self._chunked.take(backproped, name, compute)

        def _given(self, backproped):
            """``backproped``, formed if lazy and the layer takes no lazy factor.

            The ledger forms such a factor first; this keeps the steps right
            regardless.
            """
            if not takes_lazy and isinstance(backproped, LazyColumns):
                return backproped.materialise()
            return backproped

        def bias(self, ext, module, g_inp, g_out, backproped):  # noqa: D102
            if not _wanted(ext, module.bias):
                return None
            backproped = self._given(backproped)
            if isinstance(backproped, LazyColumns):
                return self._from_chunks(ext, module, backproped, "bias")
            return self._dense_bias(ext, module, g_inp, g_out, backproped)

        def weight(self, ext, module, g_inp, g_out, backproped):  # noqa: D102
            if not _wanted(ext, module.weight):
                return None
            backproped = self._given(backproped)
            if isinstance(backproped, LazyColumns):
                return self._from_chunks(ext, module, backproped, "weight")
            subsampling = ext.get_subsampling()
            factor = build(module, backproped, subsampling)
            if factor is not None:
                return factor
            return self.derivatives.param_mjp(
                "weight", module, g_inp, g_out, backproped,
                sum_batch=False, subsampling=subsampling,
            )  # fmt: skip

        def backpropagate(self, ext, module, g_inp, g_out, backproped):  # noqa: D102
            backproped = self._given(backproped)
            if isinstance(backproped, LazyColumns):
                return self._from_chunks(ext, module, backproped, "input")
            if lazy_aware:
                lazy = lazy_backpropagate(
                    self.derivatives, module, backproped, ext.get_subsampling()
                )
                if lazy is not None:
                    return lazy
            return super().backpropagate(ext, module, g_inp, g_out, backproped)

    _FactoredSqrt.__name__ = f"Factored{base.__name__}"
    return _FactoredSqrt


def _wanted(ext: Any, param: Tensor) -> bool:
    """Whether ``ext`` needs ``param``'s factor (extensions without a set: all)."""
    wants = getattr(ext, "wants", None)
    return wants is None or wants(param)


def _wants(ext: Any) -> Callable[[Tensor], bool]:
    """``param -> bool``: whether ``ext`` needs a factor for ``param``."""
    return lambda param: param.requires_grad and _wanted(ext, param)


def _factored_grads(base: type, build: Callable) -> type:
    """BackPACK's per-sample-gradient handler ``base``, weight from ``build(...)``."""

    class _FactoredGrads(base):
        def __init__(self):
            super().__init__()
            self._dense_weight = self._make_param_function("weight")

        def weight(self, ext, module, g_inp, g_out, bp_quantities):  # noqa: D102
            grads = build(module, g_out[0], ext.get_subsampling())
            if grads is not None:
                return grads
            return self._dense_weight(ext, module, g_inp, g_out, bp_quantities)

    _FactoredGrads.__name__ = f"Factored{base.__name__}"
    return _FactoredGrads


#: Module class -> factored handler, for the GGN factor and per-sample gradients
#: (built from :data:`vivitlib.extensions.layers.FACTORED_LAYERS`).
FACTORED_SQRT = {
    cls: _factored_sqrt(rule.sqrt_handler, rule.weight_factor, rule.derivatives)
    for cls, rule in FACTORED_LAYERS.items()
}
FACTORED_GRADS = {
    cls: _factored_grads(rule.grads_handler, rule.weight_grads)
    for cls, rule in FACTORED_LAYERS.items()
}


class _KnowsItsLayers(BackpropExtension):
    """Records which module classes the extension has a rule for.

    BackPACK keeps its table private and reports a missing rule only by the
    text of a ``NotImplementedError``; placed between an extension and
    ``BackpropExtension`` in the method order, this sees the table as it is
    built, so unsupported layers are recognised before BackPACK runs.
    """

    def __init__(self, savefield: str, module_exts: dict, *args, **kwargs):
        self.handlers: dict[type, Any] = dict(module_exts)
        super().__init__(savefield, module_exts, *args, **kwargs)

    def set_module_extension(self, module, extension, overwrite: bool = False):
        """Register ``extension`` for ``module`` (BackPACK's API), and record it."""
        super().set_module_extension(module, extension, overwrite=overwrite)
        self.handlers[module] = extension


class GGNFactorExtension(SqrtGGN, _KnowsItsLayers):
    """GGN factor ``V`` (exact or Monte-Carlo, optionally sub-sampled), factored.

    Args:
        owner: Receives every module call (validation, roll-back).
        mc_samples: 0 for the exact loss-Hessian factor, ``m > 0`` for ``m``
            Monte-Carlo samples.
        subsampling: Sample indices whose columns are kept (``None``: all).
        savefield: Attribute of each parameter the factor is stored under
            (private per collector, so several can share one pass).
        params: The parameters whose factors are needed (``None``: every
            parameter reached). Factors of others are not formed, and the
            backpropagation stops once all of these have theirs
            (:class:`~vivitlib.extensions.reach.RemainingParams`).
        deflate: Give an exact cross-entropy factor ``C - 1`` columns per
            sample (:func:`~vivitlib.extensions.losses.cross_entropy_column_basis`);
            the owner maps them back to BackPACK's ``C`` where columns are
            public.
        grads_partner: The per-sample-gradient extension that runs after
            this one in the same pass (or ``None``): where both are of the
            same samples, unfolded convolution inputs are handed over to it
            (:func:`~vivitlib.extensions.layers.handing_over_inputs`).
    """

    def __init__(
        self,
        owner: PassOwner,
        mc_samples: int,
        subsampling: list[int] | None,
        savefield: str = FACTOR_FIELD,
        params: Iterable[Tensor] | None = None,
        deflate: bool = False,
        grads_partner: BatchGrad | None = None,
    ):
        strategy = (
            LossHessianStrategy.EXACT
            if mc_samples == 0
            else LossHessianStrategy.SAMPLING
        )
        super().__init__(strategy, savefield, subsampling)
        self._mc_samples = mc_samples
        self.deflate = deflate and mc_samples == 0
        self._owner = owner
        rules = {**EXTRA_SQRT, **FAST_SQRT, **BATCH_NORM_SQRT, **FACTORED_SQRT}
        for module_cls, handler in rules.items():
            self.set_module_extension(module_cls, handler(), overwrite=True)
        self.saved_quantities = QuantityLedger()
        self.pool_indices = PoolingIndices()
        self._wanted = None if params is None else {id(p) for p in params}
        self._remaining: RemainingParams | None = None
        self.grads_partner = grads_partner

    def wants(self, param: Tensor | None) -> bool:
        """Whether ``param``'s factor is needed."""
        return param is not None and (self._wanted is None or id(param) in self._wanted)

    def get_num_mc_samples(self) -> int:
        """Number of Monte-Carlo samples of the loss Hessian factor."""
        return self._mc_samples

    def set_subsampling(self, subsampling: list[int] | None) -> None:
        """Keep the columns of these samples from the next pass on (``None``: all)."""
        self._subsampling = subsampling

    def __call__(self, module: Module, g_inp, g_out) -> None:  # noqa: D102
        remaining = self._remaining
        if remaining is not None and remaining.done and not is_loss(module):
            return  # every wanted parameter has its factor: nothing left to do
        try:
            self._owner.run_extension(self._call, module, g_inp, g_out)
        except BaseException:
            self.pool_indices.clear()
            drop_handed_over()
            raise

    def _call(self, module: Module, g_inp, g_out) -> None:
        self.check_reachable(module)
        if is_loss(module):
            # a pass starts: quantities left by an aborted one (keyed by memory
            # addresses that new tensors may reuse) must not be accumulated onto
            self.saved_quantities.clear()
            drop_handed_over()
            self.pool_indices.collect(module.input0)
            self._remaining = None
            if self._wanted is not None:
                self._remaining = RemainingParams.start(self._wanted, module.input0)
        else:
            self._form_lazy_unless_accepted(module)
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                # its factors may keep the quantity: never overwrite it in place
                self.saved_quantities.pin(module.output.data_ptr())
        with (
            self.pool_indices.offered_to(module),
            handing_over_inputs(self._hands_over()),
        ):
            super().__call__(module, g_inp, g_out)
        if self._remaining is not None and self._remaining.visit(module):
            self.saved_quantities.clear()  # free what would travel further
            self.pool_indices.clear()

    def _form_lazy_unless_accepted(self, module: Module) -> None:
        """Form a lazy factor at ``module``'s output unless its rule takes it lazy."""
        key = module.output.data_ptr()
        quantity = self.saved_quantities.retrieve_quantity(key, delete_old=False)
        if not isinstance(quantity, LazyColumns):
            if isinstance(quantity, Tensor):
                current_budget().note_excess(
                    f"the factor reaching {type(module).__name__}",
                    quantity.numel() * quantity.element_size(),
                )
            return
        accepts = getattr(self.handlers.get(type(module)), "accepts_lazy", None)
        if accepts is None or not accepts(self, module, quantity):
            current_budget().note_excess(
                f"{type(module).__name__} (it needs its factor whole)",
                quantity.numel() * quantity.element_size(),
            )
            self.saved_quantities.materialise(key)

    def _hands_over(self) -> bool:
        """Whether the gradient partner takes this pass's unfolded inputs."""
        partner = self.grads_partner
        if partner is None:
            return False
        return partner.get_subsampling() == self.get_subsampling()

    def check_reachable(self, module: Module) -> None:
        """Raise if BackPACK has no rule for ``module`` or no signal reached it.

        Raises:
            UnsupportedError: No square-root GGN rule for the module's class.
            DisconnectedLossError: No backpropagated factor arrived at the module.
        """
        name = type(module).__name__
        if type(module) not in self.handlers:
            raise UnsupportedError(
                f"{name} is not supported: BackPACK has no square-root GGN rule for "
                "it. Replace the layer by a supported one (Linear, Conv1d/2d/3d, "
                "ConvTranspose, activations, pooling, Flatten, Dropout, eval-mode "
                "BatchNorm, ...) or, for residual/functional code, try "
                "extend(model, use_converter=True)."
            )
        key = module.output.data_ptr()
        if (
            not is_loss(module)
            and self.saved_quantities.retrieve_quantity(key, delete_old=False) is None
        ):
            raise DisconnectedLossError(
                f"BackPACK reached {name} without a curvature signal from the loss: "
                "extend the loss function too (loss_fn = backpack.extend(loss_fn)), "
                "apply it directly to the model's output, and keep every operation "
                "between modules a module: a functional operation (scaling, "
                "log_softmax, slicing, ...) between two modules or between the "
                "model and the loss cuts BackPACK's chain. Make it a module, or use "
                "extend(model, use_converter=True)."
            )


class BatchGradsExtension(BatchGrad):
    """Per-sample gradients, factored for linear and convolution weights.

    Args:
        owner: Receives every module call (validation, roll-back).
        subsampling: Sample indices to keep (``None``: all).
        savefield: Attribute of each parameter the gradients are stored under.
    """

    def __init__(
        self,
        owner: PassOwner,
        subsampling: list[int] | None,
        savefield: str = GRADS_FIELD,
    ):
        super().__init__(subsampling=subsampling)
        self.savefield = savefield  # BatchGrad fixes its own; ours is an argument
        self._owner = owner
        for module_cls, handler in FACTORED_GRADS.items():
            self.set_module_extension(module_cls, handler(), overwrite=True)

    def __call__(self, module: Module, g_inp, g_out) -> None:  # noqa: D102
        try:
            self._owner.run_extension(super().__call__, module, g_inp, g_out)
        finally:
            drop_handed_over()  # taken by now, or never to be
