r"""``LanczosDampedNewton``: damped Newton along Lanczos eigen-directions.

Every ``refresh_every`` steps the top-``k`` eigenpairs of the GGN (or of the
Hessian, ranked by magnitude as in saddle-free Newton) on a fixed curvature
batch are computed matrix-free with :mod:`vivitlib.hessianfree`. At every step
the backward pass that gives the gradient also gives, through
:class:`vivitlib.DirectionalDerivatives`, the per-sample derivatives
``γ_nk = d_kᵀ g_n`` and ``λ_nk = d_kᵀ G_n d_k`` along those directions, so any
damping strategy, bootstrap included, sees the mini-batch noise. The update is

.. math::
    θ \leftarrow θ - \mathrm{lr} \sum_k \frac{γ_k}{λ_k + δ_k} d_k .

With ``step_curvature="batch"`` (default) ``λ_k`` is the mean of ``λ_nk`` on
the current batch; with ``"refresh"`` it is the refresh eigenvalue ``|λ_k|``
(as in the Deep Curvature suite's Lanczos optimiser) and the per-sample
``λ_nk`` handed to the damping strategy are shifted to have that mean.
Steps between refreshes cost no extra forward or backward pass.

Reference:
    Granziol et al., Deep Curvature Suite (Lanczos optimiser), and Dangel,
    Tatzel, Hennig, ViViT (TMLR 2022), Section 4.2 (bootstrap damping).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vivitlib import hessianfree
from vivitlib._warnings import DeprecatedAlias
from vivitlib.directional import DirectionalDerivatives
from vivitlib.linalg.newton import newton_step_sizes
from vivitlib.optim._stepping import (
    SafeguardedStepping,
    add_complement,
    all_finite,
    check_hyperparameters,
    curvature_closure,
    default_momentum,
    finite_loss,
    load_pending,
    loss_value,
)
from vivitlib.optim.damping import (
    BootstrapDamping,
    as_strategy,
    check_dampings,
)
from vivitlib.optim.safeguards import StepControl

_OPERATORS = {"ggn": hessianfree.GGNOperator, "hessian": hessianfree.HessianOperator}
_WHICH = {"ggn": "largest", "hessian": "magnitude"}


@dataclass(frozen=True)
class RefreshRecord:
    """One recomputation of the directions.

    Attributes:
        step: Optimiser step before which the directions were computed.
        evals: Eigenvalues found, ``[k]`` (signed for the Hessian).
        num_products: Curvature-vector products the refresh spent.
        converged: Whether ``topk_eigh`` met its tolerance.
    """

    step: int
    evals: Tensor
    num_products: int
    converged: bool

    eigenvalues = DeprecatedAlias("evals")


class LanczosDampedNewton(SafeguardedStepping, torch.optim.Optimizer):
    """Damped Newton steps along top-``k`` Lanczos directions of a curvature batch.

    Usage::

        opt = LanczosDampedNewton(model, loss_fn, (X_curv, y_curv), k=10)
        for X, y in loader:
            opt.zero_grad()
            with backpack(*opt.extensions, extension_hook=opt.hook):
                loss_fn(model(X), y).backward()
            opt.step()

    The safeguards of :class:`~vivitlib.optim.DampedNewton` (damping floor,
    Levenberg–Marquardt damping, trust region; with a closure also the undo of a
    step that increased the batch loss) apply in the same way, with ``λ_1`` the
    largest curvature along the directions on the current batch.

    Args:
        model: The extended network (``backpack.extend``).
        loss_fn: The extended loss (``'mean'`` or ``'sum'``).
        curvature_data: Data for the refreshes: one ``(X, y)`` batch, a list of
            batches or a non-shuffling ``DataLoader``; or a callable returning
            such data, called at every refresh (a fresh curvature batch per
            refresh).
        k: Number of directions. Default 10.
        refresh_every: Steps between refreshes (``T``). Default 10.
        curvature: ``"ggn"`` (top-``k`` GGN eigenpairs) or ``"hessian"`` (top-``k``
            by magnitude). Default ``"ggn"``.
        damping: Strategy ``(gammas, lambdas) -> [K]`` or a number. Default
            :class:`~vivitlib.optim.BootstrapDamping`.
        lr: Learning rate. Default 1.0.
        step_curvature: ``"batch"`` or ``"refresh"`` (see module docstring).
        mc_samples: ``0`` exact per-sample GGN curvatures, ``m > 0`` MC.
        subsampling: Samples of each batch used for ``λ_nk``.
        grad_subsampling: Samples of each batch used for ``γ_nk``.
        tol: Relative tolerance of the eigenpairs. Default ``1e-3``.
        max_products: Product budget per refresh (``topk_eigh``'s default if None).
        generator: Start vectors of the Lanczos runs (reproducible refreshes).
        params: Parameters to optimise (default all trainable ones of ``model``).
        safeguards: The step safeguards, configured like those of
            :class:`~vivitlib.optim.DampedNewton` by the keyword arguments
            ``adaptive_damping``, ``initial_damping``, ``damping_floor``,
            ``trust_radius``, ``trust_solve`` and ``reject_steps``.
        complement_lr: ``η >= 0``: a gradient step ``-η m`` in the complement of
            the ``k`` directions, ``m ← β m + (g - Σ_k γ_k d_k)``, or
            ``"auto"`` (needs the safeguards): ``η = c / λ_1`` with ``c``
            adapted to ``ρ`` as in :class:`~vivitlib.optim.DampedNewton`; the
            trust region bounds the whole step. Default: ``0.0`` (the
            directions only, as before; not yet measured on the benchmark).
        complement_momentum: ``β`` in ``[0, 1)`` (restarted after an undone
            step). Default: ``None``, i.e. ``0.9`` with ``"auto"``, else ``0``.

    Raises:
        ValueError: On invalid options.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        curvature_data: Any,
        *,
        k: int = 10,
        refresh_every: int = 10,
        curvature: str = "ggn",
        damping: Callable[[Tensor, Tensor], Tensor] | float | None = None,
        lr: float = 1.0,
        step_curvature: str = "batch",
        mc_samples: int = 0,
        subsampling: Sequence[int] | None = None,
        grad_subsampling: Sequence[int] | None = None,
        tol: float = 1e-3,
        max_products: int | None = None,
        generator: torch.Generator | None = None,
        params: Sequence[Tensor] | None = None,
        safeguards: bool = True,
        adaptive_damping: bool = True,
        initial_damping: float = 1e-3,
        damping_floor: float = 1e-4,
        trust_radius: float | None = 10.0,
        trust_solve: str = "auto",
        reject_steps: bool = True,
        complement_lr: float | str = 0.0,
        complement_momentum: float | None = None,
    ) -> None:
        if curvature not in _OPERATORS:
            raise ValueError(
                f"curvature must be 'ggn' or 'hessian', got {curvature!r}."
            )
        if step_curvature not in ("batch", "refresh"):
            raise ValueError(
                f"step_curvature must be 'batch' or 'refresh', got {step_curvature!r}."
            )
        for name, value in (("k", k), ("refresh_every", refresh_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        damping = BootstrapDamping() if damping is None else damping
        defaults = {"lr": lr, "complement_lr": complement_lr,
                    "complement_momentum": default_momentum(
                        complement_lr, complement_momentum)}  # fmt: skip
        check_hyperparameters(defaults)
        if complement_lr == "auto" and not safeguards:
            raise ValueError(
                "complement_lr='auto' adapts to the safeguards' ratio; pass a "
                "number or safeguards=True."
            )
        for name, flag in (("safeguards", safeguards), ("reject_steps", reject_steps)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag)}.")
        self.safeguards, self.reject_steps = safeguards, reject_steps
        self._control_options = {
            "adaptive": adaptive_damping, "initial_damping": initial_damping,
            "floor": damping_floor, "radius": trust_radius, "trust_solve": trust_solve,
        }  # fmt: skip
        self._controls = [self._new_control()]
        self._pending = None
        self.num_rejected = 0
        self._strategies = [as_strategy(damping)]
        super().__init__(list(params), defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LanczosDampedNewton optimises one parameter group.")
        self._model, self._loss_fn, self._data = model, loss_fn, curvature_data
        self.k, self.refresh_every = k, refresh_every
        self.curvature, self.step_curvature = curvature, step_curvature
        self._dd_options = {
            "mc_samples": mc_samples,
            "subsampling": subsampling,
            "grad_subsampling": grad_subsampling,
        }
        self._eigh_options = {"tol": tol, "max_products": max_products}
        self._generator = generator
        self.refresh_history: list[RefreshRecord] = []
        self._num_steps = 0
        self._evecs: list[Tensor] | None = None
        self._evals: Tensor | None = None
        # validate the derivative options now; the directions come lazily
        self._make_collector([p.new_zeros(1, *p.shape) for p in self.params])

    @property
    def params(self) -> list[Tensor]:
        """The optimised parameters."""
        return self.param_groups[0]["params"]

    @property
    def extensions(self) -> tuple:
        """BackPACK extensions for ``with backpack(*opt.extensions, ...)``.

        The first access runs the first refresh (see :meth:`refresh`).
        """
        return self._ensure_directions().extensions

    @property
    def hook(self) -> Callable:
        """Extension hook for ``backpack(..., extension_hook=opt.hook)``.

        The first access runs the first refresh (see :meth:`refresh`).
        """
        return self._ensure_directions().hook

    @property
    def evecs(self) -> list[Tensor]:
        """The directions ``d_k``, one ``[k, *param.shape]`` tensor per parameter.

        The first access runs the first refresh (see :meth:`refresh`).
        """
        self._ensure_directions()
        return self._evecs

    @property
    def evals(self) -> Tensor:
        """The refresh curvatures ``|λ_k|`` along :attr:`evecs`, ``[k]`` (float64).

        The first access runs the first refresh (see :meth:`refresh`).
        """
        self._ensure_directions()
        return self._evals

    directions = DeprecatedAlias("evecs")
    eigenvalues = DeprecatedAlias("evals")

    def _ensure_directions(self) -> DirectionalDerivatives:
        """The derivative collector, after the first refresh if none ran yet."""
        if self._evecs is None:
            self.refresh()
        return self._collector

    @torch.enable_grad()
    def refresh(self) -> RefreshRecord:
        """Recompute the top-``k`` directions on the curvature data now.

        The constructor computes nothing: the first refresh runs at the first
        access of :attr:`extensions`, :attr:`hook`, :attr:`evecs` or
        :attr:`evals` (so, in the usual loop, just before the first backward
        pass), or when called explicitly; later ones after every
        ``refresh_every``-th step. The model is switched to ``eval()`` for the
        curvature products and back to its previous training mode afterwards.

        Returns:
            The refresh's record (also appended to :attr:`refresh_history`).
        """
        was_training = self._model.training
        self._model.eval()
        try:
            data = self._data() if callable(self._data) else self._data
            op = _OPERATORS[self.curvature](
                self._model, self._loss_fn, data, params=self.params
            )
            k = min(self.k, op.shape[0])
            result = hessianfree.topk_eigh(
                op,
                k,
                which=_WHICH[self.curvature],
                generator=self._generator,
                **self._eigh_options,
            )
        finally:
            self._model.train(was_training)
        record = RefreshRecord(
            step=self._num_steps,
            evals=result.evals.detach().cpu(),
            num_products=result.num_products,
            converged=result.converged,
        )
        self.refresh_history.append(record)
        self._set_directions(
            [e.detach().to(p.dtype) for e, p in zip(result.evecs, self.params)],
            result.evals.detach().to(torch.float64).abs(),
        )
        return record

    def _set_directions(self, directions: list[Tensor], eigenvalues: Tensor) -> None:
        self._collector = self._make_collector(directions)
        self._evecs, self._evals = directions, eigenvalues

    def _make_collector(self, directions: list[Tensor]) -> DirectionalDerivatives:
        return DirectionalDerivatives(self.params, directions, **self._dd_options)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Apply one step; refresh the directions every ``refresh_every`` steps.

        Args:
            closure: Optional; computes the loss and calls ``backward()`` inside
                ``backpack(*self.extensions, extension_hook=self.hook)``.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: If no backward pass collected the derivatives.
        """
        loss = None
        if closure is not None:
            loss = curvature_closure(closure, self._ensure_directions())
        try:
            if self._evecs is None:
                raise RuntimeError("no directions yet")
            gammas, lambdas = self._collector.gammas, self._collector.lambdas
            scale = getattr(self._collector, "batch_scale", 1.0)
        except RuntimeError as err:
            raise RuntimeError(
                "LanczosDampedNewton.step() found no directional derivatives; run "
                "the backward pass inside `with backpack(*opt.extensions, "
                "extension_hook=opt.hook):` first."
            ) from err
        finally:
            if self._evecs is not None:
                self._collector.reset()
        gammas, lambdas = gammas * scale, lambdas * scale
        if loss is not None and not finite_loss(loss):
            self._warn(f"the loss is not finite ({loss_value(loss)})")
            return loss
        grads = [p.grad for p in self.params if p.grad is not None]
        if not all_finite([gammas, lambdas, *grads]):
            self._warn("the gradient is not finite")
            return loss
        if self.step_curvature == "refresh":
            lambdas = lambdas - lambdas.mean(0) + self._evals.to(lambdas)
        group = self.param_groups[0]
        saved, saved_pending = self._controls[0].state_dict(), self._pending
        try:
            self._adapt_late([(p, p.grad) for p in self.params if p.grad is not None])
            strategy = self._group_strategy(0)
            dampings = check_dampings(
                strategy(gammas, lambdas), gammas.shape[1], strategy
            )
            curv = lambdas.mean(0)
            # directions without positive curvature on this batch take no step
            dampings = torch.where(curv > 0, dampings.to(curv), torch.inf)
            plan = None
            if bool(torch.isfinite(dampings).any()):
                plan = self._controls[0].plan(
                    gammas.mean(0), curv.clamp(min=0), dampings, group["lr"],
                    checked=closure is not None,
                )  # fmt: skip
        except BaseException:
            self._controls[0].load_state_dict(saved)
            self._pending = saved_pending
            raise
        moves, buffers = [], None
        if plan is not None:
            update = [
                torch.tensordot(plan.coefficients.to(p.dtype), d, dims=1)
                for p, d in zip(self.params, self._evecs)
            ]
            rate = group.get("complement_lr", 0.0)  # absent in older states
            if rate == "auto":
                rate = self._controls[0].complement_rate(float(curv.max()))
            if rate > 0:
                momentum = group.get("complement_momentum", 0.0)
                update, plan, buffers = self._add_complement(
                    update, plan, gammas.mean(0), rate, momentum
                )
            moves = [(p, u, 1.0) for p, u in zip(self.params, update)]
        try:
            kept = self._commit(moves, [plan], closure, loss, self.params)
        except BaseException:
            self._controls[0].load_state_dict(saved)
            self._pending = saved_pending
            raise
        for number, param in enumerate(self.params):
            if kept and buffers is not None:
                self.state[param]["complement_buffer"] = buffers[number]
            elif param in self.state:  # restart the momentum after an undone step
                self.state[param].pop("complement_buffer", None)
        self._num_steps += 1
        if self._num_steps % self.refresh_every == 0:
            self.refresh()
        return loss

    def _add_complement(self, update, plan, gamma_means, rate, momentum):
        """Add the flat-complement step (:func:`~._stepping.add_complement`).

        ``g - P g = g - Σ_k γ_k d_k`` with the directions ``d_k``
        (orthonormal to the Lanczos tolerance) and the batch gradient ``g``.
        """
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        perps = [
            g - torch.tensordot(gamma_means.to(g.dtype), d, dims=1)
            for g, d in zip(grads, self._evecs)
        ]
        buffers = [  # read without creating state entries (defaultdict)
            self.state[p].get("complement_buffer") if p in self.state else None
            for p in self.params
        ]
        radius = self._controls[0].radius
        return add_complement(
            update, plan, grads, perps, rate, radius, momentum, buffers
        )

    def _warn(self, reason: str) -> None:
        warnings.warn(
            f"LanczosDampedNewton: {reason}; the parameters are left unchanged in "
            "this step.",
            UserWarning,
            stacklevel=3,
        )

    @staticmethod
    def step_coefficients(gammas: Tensor, lambdas: Tensor, dampings: Tensor) -> Tensor:
        """Step sizes ``-γ_k / (λ_k + δ_k)`` from sample means, ``[K]``.

        Zero where ``δ_k = inf`` or ``λ_k + δ_k ≤ 0`` (no step along ``d_k``).
        """
        return newton_step_sizes(
            gammas.mean(0), lambdas.mean(0), dampings.to(lambdas.dtype)
        )

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state with the current directions and the strategy's state.

        ``"evecs"`` and ``"evals"`` are ``None`` before the first refresh (taking
        the state runs none).
        """
        damping_state = self._strategy_states()[0]["state"]
        state = super().state_dict()
        evecs, evals = self._evecs, self._evals
        state["evecs"] = None if evecs is None else [d.clone() for d in evecs]
        state["evals"] = None if evals is None else evals.clone()
        state["num_steps"] = self._num_steps
        state["damping_state"] = damping_state
        state["control_state"] = self._controls[0].state_dict()
        state["pending"] = self._pending_state()
        state["num_rejected"] = self.num_rejected
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, including the directions (no refresh).

        Everything is validated first: a failing load changes nothing. States
        saved with the former keys ``"directions"``/``"eigenvalues"`` load too.

        Raises:
            TypeError, ValueError: If directions or eigenvalues do not fit the
                parameters, or a stored setting is invalid.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict)}.")
        state_dict = dict(state_dict)
        for new, old in (("evecs", "directions"), ("evals", "eigenvalues")):
            if new not in state_dict and old in state_dict:
                state_dict[new] = state_dict.pop(old)
        try:
            directions = state_dict.pop("evecs")
            eigenvalues = state_dict.pop("evals")
            num_steps = state_dict.pop("num_steps")
        except KeyError as err:
            raise ValueError(
                f"state_dict lacks {err}; pass the dict returned by "
                "LanczosDampedNewton.state_dict()."
            ) from err
        damping_state = state_dict.pop("damping_state", {})
        control_state = state_dict.pop("control_state", None)
        pending = load_pending(state_dict.pop("pending", None), 1)
        num_rejected = state_dict.pop("num_rejected", self.num_rejected)
        if (directions is None) != (eigenvalues is None):
            raise ValueError(
                "state_dict holds only one of 'evecs' and 'evals'; pass the dict "
                "returned by LanczosDampedNewton.state_dict()."
            )
        if directions is not None:
            self._check_loaded(directions, eigenvalues)
        _check_counters(num_steps, num_rejected)
        if control_state is not None:
            StepControl.check_state(control_state)
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("state_dict must hold exactly one parameter group.")
        if len(groups[0].get("params", [])) != len(self.params):
            raise ValueError(
                f"state_dict's group has {len(groups[0].get('params', []))} "
                f"parameters, this optimizer {len(self.params)}."
            )
        saved_group = {k: v for k, v in groups[0].items() if k != "params"}
        check_hyperparameters({**saved_group, "lr": groups[0].get("lr")})
        strategy = self._group_strategy(0)
        if hasattr(strategy, "check_state"):
            strategy.check_state(damping_state)
        super().load_state_dict(state_dict)
        if hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(damping_state)
        if control_state is not None:
            self._controls[0].load_state_dict(control_state)
        self._pending = pending
        self._num_steps = int(num_steps)
        self.num_rejected = int(num_rejected)
        if directions is None:
            self._evecs = self._evals = None  # refreshed lazily
        else:
            self._set_directions([d.clone() for d in directions], eigenvalues.clone())

    def _check_loaded(self, directions: Any, eigenvalues: Any) -> None:
        """Raise unless the saved directions fit this optimizer."""
        if not isinstance(directions, list | tuple) or len(directions) != len(
            self.params
        ):
            raise ValueError(
                f"state_dict holds {len(directions)} direction tensors for "
                f"{len(self.params)} parameters."
            )
        if not isinstance(eigenvalues, Tensor) or eigenvalues.ndim != 1:
            raise ValueError("state_dict 'evals' must be a 1-d tensor.")
        k = eigenvalues.numel()
        for number, (d, p) in enumerate(zip(directions, self.params)):
            if not isinstance(d, Tensor) or tuple(d.shape) != (k, *p.shape):
                raise ValueError(
                    f"state_dict direction {number} has shape "
                    f"{tuple(getattr(d, 'shape', ()))}, expected {(k, *p.shape)} "
                    f"({k} directions of parameter shape {tuple(p.shape)})."
                )
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"state_dict direction {number} is not finite.")
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("state_dict 'evals' are not finite.")


def _check_counters(num_steps: Any, num_rejected: Any) -> None:
    """Raise unless the saved step and rejection counts are ints ``>= 0``."""
    for name, value in (("num_steps", num_steps), ("num_rejected", num_rejected)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"state_dict {name!r} must be an int >= 0, got {value!r}.")
