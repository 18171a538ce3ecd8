"""Apply a planned step, measure the actual loss change, adapt or undo (shared)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from backpack import backpack
from torch import Tensor

from vivitlib.distributed import mean_over_ranks
from vivitlib.optim.damping import as_strategy, strategy_state
from vivitlib.optim.safeguards import StepControl, StepPlan, agreement

#: One parameter's move: ``(param, delta, decay)``; ``θ ← decay · θ + delta``.
Move = tuple[Tensor, Tensor, float]


def check_hyperparameters(group: dict[str, Any]) -> None:
    """Validate ``lr``, ``weight_decay``, ``complement_lr``/``_momentum`` of a group."""
    checks = (("lr", True), ("weight_decay", False), ("complement_lr", False),
              ("complement_momentum", False))  # fmt: skip
    for name, positive in checks:
        if name not in group:
            continue
        value = group[name]
        if name == "complement_lr" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a float, got {type(value)}.")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"{name} must be finite and {bound}, got {value}.")
        if name == "complement_momentum" and value >= 1:
            raise ValueError(f"complement_momentum must lie in [0, 1), got {value}.")


def loss_value(loss: Any) -> float:
    """The loss as a Python float (sum for a non-scalar tensor)."""
    if isinstance(loss, Tensor):
        return float(loss.detach().sum())
    return float(loss)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def finite_loss(loss: Any) -> bool:
    """Whether the loss (tensor or number) is finite."""
    return math.isfinite(loss_value(loss))


def default_momentum(complement_lr: Any, momentum: float | None) -> float:
    """``complement_momentum``'s default: 0.9 with the adaptive rate, else 0."""
    if momentum is None:
        return 0.9 if complement_lr == "auto" else 0.0
    return momentum


def check_loss(loss: Any) -> None:
    """Raise ``TypeError`` unless a closure returned a scalar loss."""
    scalar = isinstance(loss, Tensor) and loss.numel() == 1
    if not (scalar or isinstance(loss, int | float)) or isinstance(loss, bool):
        what = type(loss).__name__
        if isinstance(loss, Tensor):
            what += f" of shape {tuple(loss.shape)}"
        raise TypeError(
            f"The closure returned {what}; it must compute the loss, call "
            "loss.backward() and return the scalar loss."
        )


def curvature_closure(closure: Callable[[], Any], collector: Any) -> Any:
    """Run ``closure`` inside BackPACK for ``collector``; return its checked loss.

    Args:
        closure: Computes the loss and calls ``backward()`` on it.
        collector: Owner of the BackPACK ``extensions`` and ``hook`` (reset if
            the closure fails, so no half-collected pass survives).

    Raises:
        TypeError: If the closure does not return a scalar loss.
    """
    try:
        with (
            torch.enable_grad(),
            backpack(*collector.extensions, extension_hook=collector.hook),
        ):
            loss = closure()
        check_loss(loss)
    except BaseException:
        collector.reset()
        raise
    return loss


def add_complement(
    update: Sequence[Tensor],
    plan: StepPlan,
    grads: Sequence[Tensor],
    perps: Sequence[Tensor],
    rate: float,
    radius: float | None,
    momentum: float,
    buffers: Sequence[Tensor | None],
) -> tuple[list[Tensor], StepPlan, list[Tensor] | None]:
    """Add ``-η m``, ``m = β m' + (g - P g)``: a step in the flat complement.

    ``m`` is the complement gradient ``g - P g`` (``perps``) with heavy-ball
    momentum ``β`` (``m'``: the previous step's ``m`` from ``buffers``, ``None``
    where there is none; ``β = 0``: the plain complement gradient). The
    complement is (nearly, with momentum) orthogonal to the Newton step, so the
    trust region (``radius``, if any) bounds ``sqrt(‖Newton‖² + η² ‖m‖²)``; the
    predicted change gains the linear term ``-η gᵀ m``.

    Args:
        update: The Newton step, one tensor per parameter.
        plan: Its plan.
        grads: The batch gradient ``g``, one tensor per parameter.
        perps: ``g - P g``, one tensor per parameter.
        rate: ``η > 0``.
        radius: Trust radius or ``None``.
        momentum: ``β`` in ``[0, 1)``.
        buffers: ``m'`` per parameter (``None``: none yet).

    Returns:
        The combined step, its plan and the new buffers (``None`` for ``β = 0``).
    """
    new_buffers = None
    if momentum > 0:
        perps = [
            q if b is None or b.shape != q.shape else q + momentum * b.to(q)
            for q, b in zip(perps, buffers)
        ]
        new_buffers = [q.detach().clone() for q in perps]
    perp_sq = sum(float(q.double().pow(2).sum()) for q in perps)
    slope = perp_sq  # gᵀ(g - P g) = ‖g - P g‖²; with momentum gᵀ m
    if momentum > 0:
        slope = sum(
            float((g.double() * q.double()).sum()) for g, q in zip(grads, perps)
        )
    if radius is not None and perp_sq > 0:
        room = max(radius**2 - plan.step_norm**2, 0.0) ** 0.5
        rate = min(rate, room / perp_sq**0.5)
    out = [u - rate * q for u, q in zip(update, perps)]
    plan = replace(
        plan,
        predicted=plan.predicted - rate * slope,
        step_norm=(plan.step_norm**2 + rate**2 * perp_sq) ** 0.5,
        complement=rate,
    )
    return out, plan, new_buffers


def restore(params: Sequence[Tensor], values: Sequence[Tensor], grads) -> None:
    """Put back parameter values and ``.grad`` saved before a step."""
    for param, value, grad in zip(params, values, grads):
        param.copy_(value)
        param.grad = grad


class SafeguardedStepping:
    """Mixin of the Newton optimisers: apply moves, judge them with ``ρ``.

    The host defines ``state``, ``param_groups``, ``safeguards``, ``reject_steps``,
    ``num_rejected``, ``_controls`` (one :class:`StepControl` per group),
    ``_strategies`` (one damping strategy per group) and ``_pending``.

    Damping strategies are objects (they may hold a random generator), so, as
    ``torch.optim`` keeps ``param_groups`` numeric, they live in
    :attr:`damping_strategies`, one per group, and not in the groups.
    """

    state: Any

    def _new_control(self) -> StepControl:
        """A group's safeguards: ``_control_options``, or none without them."""
        if self.safeguards:
            return StepControl(**self._control_options)
        return StepControl(adaptive=False, initial_damping=0.0, floor=0.0, radius=None)

    param_groups: list[dict[str, Any]]
    _strategies: list[Any]
    safeguards: bool
    reject_steps: bool
    num_rejected: int
    _controls: list[StepControl]
    _pending: dict[str, Any] | None
    #: Process group whose ranks must take identical steps (``None``: one process).
    _process_group: Any = None

    @property
    def damping_strategies(self) -> list[Any]:
        """The damping strategy of each parameter group (``[i]``: group ``i``).

        Replace an entry to change a group's strategy (a callable
        ``(gammas, lambdas) -> dampings`` or a number for
        :class:`~vivitlib.optim.ConstantDamping`); it is checked at the next step.
        """
        return self._strategies

    def _group_strategy(self, index: int) -> Any:
        """Group ``index``'s strategy, after taking up a deprecated group entry.

        Raises:
            TypeError: If the strategy is neither callable nor a number.
        """
        group = self.param_groups[index]
        if "damping" in group:
            warnings.warn(
                f"Setting param_groups[{index}]['damping'] is deprecated (groups "
                "hold numbers only); assign opt.damping_strategies"
                f"[{index}] instead.",
                DeprecationWarning,
                stacklevel=4,
            )
            self._strategies[index] = as_strategy(group.pop("damping"))
        self._strategies[index] = as_strategy(self._strategies[index])
        return self._strategies[index]

    def _strategy_states(self) -> list[dict[str, Any]]:
        """Type name and ``state_dict()`` of every group's strategy."""
        return [
            {"type": type(strategy).__name__, "state": strategy_state(strategy)}
            for strategy in (
                self._group_strategy(i) for i in range(len(self.param_groups))
            )
        ]

    def _tell_rejected(self) -> None:
        """Tell every group's strategy that its last step was undone.

        Strategies that carry state across steps (the shrinkage rule of
        :class:`~vivitlib.optim.BootstrapDamping`) offer ``step_rejected()``;
        the others are left alone.
        """
        for strategy in self._strategies:
            hook = getattr(strategy, "step_rejected", None)
            if callable(hook):
                hook()

    def _across_ranks(self, value: float) -> float:
        """A loss change or slope, averaged over the ranks (so ``ρ`` agrees)."""
        return mean_over_ranks(value, self._process_group)

    def _adapt_late(self, grads: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Adapt the controls to the previous step by the secant rule (no closure).

        Args:
            grads: ``(param, gradient at the new point)`` pairs.
        """
        pending, self._pending = self._pending, None
        if pending is None or not self.safeguards:
            return
        new_slope = 0.0
        for param, grad in grads:
            step = self.state[param].get("last_step")
            if step is None or step.shape != param.shape:
                return
            new_slope += float((grad.double() * step.double()).sum())
        actual = 0.5 * (pending["slope"] + self._across_ranks(new_slope))
        rho = agreement(actual, pending["predicted"])
        for control, plan in zip(self._controls, pending["plans"]):
            if plan is not None:
                control.update(rho, plan)

    def _commit(
        self,
        moves: Sequence[Move],
        plans: Sequence[StepPlan | None],
        closure: Callable[[], Tensor] | None,
        loss: Any,
        all_params: Sequence[Tensor],
    ) -> bool:
        """Apply ``moves``; with a closure measure ``ρ``, adapt, maybe undo.

        Args:
            moves: The parameter moves.
            plans: Each group's plan (``None``: no step in that group).
            closure: The step's closure or ``None``.
            loss: The loss before the step (closure only).
            all_params: Every parameter of the optimiser (saved for an undo).

        Returns:
            Whether the step was kept.
        """
        measure = closure is not None and self.safeguards
        if measure:
            before = [p.detach().clone() for p in all_params]
            grads = [None if p.grad is None else p.grad.clone() for p in all_params]
        predicted = sum(p.predicted for p in plans if p is not None)
        slope = 0.0
        for param, delta, decay in moves:
            grad = param.grad
            if decay != 1.0:
                param.mul_(decay)
            delta = delta.to(param.dtype)
            param.add_(delta)
            if grad is not None:
                slope += float((grad.double() * delta.double()).sum())
            if self.safeguards and not measure:
                self.state[param]["last_step"] = delta.detach().clone()
        if not measure:
            if self.safeguards:
                slope = self._across_ranks(slope)
                self._pending = {
                    "predicted": predicted, "slope": slope, "plans": list(plans)
                }  # fmt: skip
            return True
        try:
            with torch.enable_grad():
                new_loss = closure()
            check_loss(new_loss)
        except BaseException:
            restore(all_params, before, grads)
            raise
        actual = self._across_ranks(loss_value(new_loss) - loss_value(loss))
        rho = agreement(actual, predicted)
        for control, plan in zip(self._controls, plans):
            if plan is not None:
                control.update(rho, plan)
        if self.reject_steps and not actual <= 0:
            restore(all_params, before, grads)
            self.num_rejected += 1
            self._tell_rejected()
            return False
        for param, grad in zip(all_params, grads):
            param.grad = grad
        return True

    def _pending_state(self) -> dict[str, Any] | None:
        if self._pending is None:
            return None
        return {
            "predicted": self._pending["predicted"],
            "slope": self._pending["slope"],
            "plans": [None if p is None else plan_state(p) for p in
                      self._pending["plans"]],
        }  # fmt: skip


def plan_state(plan: StepPlan) -> dict[str, Any]:
    """A :class:`StepPlan` as a ``weights_only``-loadable dict."""
    return {
        "dampings": plan.dampings.clone(), "coefficients": plan.coefficients.clone(),
        "scale": plan.scale, "predicted": plan.predicted,
        "step_norm": plan.step_norm, "clipped": plan.clipped,
        "complement": plan.complement,
    }  # fmt: skip


def load_pending(pending: Any, num_groups: int) -> dict[str, Any] | None:
    """Validate and rebuild a saved pending secant record."""
    if pending is None:
        return None
    plans = pending.get("plans") if isinstance(pending, dict) else None
    if not isinstance(plans, list) or len(plans) != num_groups:
        raise ValueError("state_dict 'pending' does not match the parameter groups.")
    try:
        rebuilt = [None if p is None else StepPlan(**p) for p in plans]
        predicted, slope = float(pending["predicted"]), float(pending["slope"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"state_dict 'pending' is malformed: {err}") from err
    if not (math.isfinite(predicted) and math.isfinite(slope)):
        raise ValueError("state_dict 'pending' holds non-finite values.")
    return {"predicted": predicted, "slope": slope, "plans": rebuilt}
