"""``DampedNewton``: Newton steps along GGN eigen-directions with directional damping.

Reference:
    Dangel, Tatzel, Hennig. ViViT: Curvature access through the generalized
    Gauss-Newton's low-rank structure. TMLR 2022, Section 4.2.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from backpack import backpack
from torch import Tensor

from vivitlib.ggn import LowRankGGN
from vivitlib.optim.damping import BootstrapDamping, ConstantDamping

_COMPUTE = ("eigenvalues", "directional_derivatives", "newton_step")
_HINT = (
    "Run the forward and backward pass inside "
    "`with backpack(*opt.extensions, extension_hook=opt.hook):` before every "
    "opt.step(), or pass a closure that computes the loss and calls backward()."
)


@dataclass(frozen=True)
class DampingRecord:
    """Dampings chosen for one parameter group in one step.

    Attributes:
        step: Index of the ``step()`` call (starting at ``0``).
        group: Index of the parameter group.
        evals: Curvatures ``λ_k`` along the directions, ``[K]``.
        gamma_means: Directional gradients ``γ_k``, ``[K]``.
        dampings: Dampings ``δ_k`` (``inf``: no step), ``[K]``.
        applied: Whether the group's parameters were updated.
    """

    step: int
    group: int
    evals: Tensor
    gamma_means: Tensor
    dampings: Tensor
    applied: bool


def _as_strategy(damping: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn a number into :class:`ConstantDamping`; check other values are callable."""
    if isinstance(damping, int | float) and not isinstance(damping, bool):
        return ConstantDamping(float(damping))
    if not callable(damping):
        raise TypeError(
            "damping must be a damping strategy (callable (gammas, lambdas) -> "
            f"dampings) or a number, got {type(damping)}."
        )
    return damping


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Validate ``lr`` and ``weight_decay`` of a parameter group."""
    for name, positive in (("lr", True), ("weight_decay", False)):
        if name not in group:
            continue
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a float, got {type(value)}.")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"{name} must be finite and {bound}, got {value}.")


class DampedNewton(torch.optim.Optimizer):
    r"""Damped Newton steps in the GGN's nontrivial eigenspace, per parameter group.

    For each parameter group (one block of a block-diagonal GGN) a step is

    .. math::
        θ \leftarrow (1 - \mathrm{lr} \cdot \mathrm{wd})\, θ
            - \mathrm{lr} \sum_{k=1}^{K} \frac{γ_k}{λ_k + δ_k} e_k ,

    with ``(λ_k, e_k)`` the ``K`` nontrivial GGN eigenpairs of the group,
    ``γ_k = e_kᵀ g`` the directional gradient, and dampings ``δ_k`` from the group's
    strategy, called as ``damping(gammas, lambdas)`` with the per-sample
    directional derivatives ``gammas [N_g, K]`` and ``lambdas [N_c, K]``;
    ``δ_k = inf`` leaves direction ``k`` alone. Flat directions (``λ = 0``) are not
    updated. The coefficients are assembled in Gram space and lifted once per
    group (:meth:`vivitlib.GGNBlock.newton_step`). Weight decay is decoupled
    (applied to the parameters, not to the quadratic model).

    Usage (the backward pass must run inside ``backpack``, with model and loss
    extended by ``backpack.extend``)::

        opt = DampedNewton(model.parameters(), damping=BootstrapDamping())
        opt.zero_grad()
        with backpack(*opt.extensions, extension_hook=opt.hook):
            loss_fn(model(X), y).backward()
        opt.step()

    A step changes nothing (and warns) for a group without a direction of positive
    curvature, where the strategy rejects every direction (``δ_k = inf``, e.g.
    when the batch carries no signal) or where the step is not finite.

    Args:
        params: Parameters or parameter groups (dicts with ``"params"`` and
            optionally ``"lr"``, ``"damping"``, ``"weight_decay"``).
        damping: Damping strategy or a number (turned into
            :class:`~vivitlib.optim.ConstantDamping`). Default: a new
            :class:`~vivitlib.optim.BootstrapDamping`.
        lr: Learning rate, ``> 0``. Default: ``1.0``.
        mc_samples: ``0`` for the exact GGN, ``m > 0`` for ``m`` Monte-Carlo samples
            of the loss Hessian factor per sample. Default: ``1``.
        subsampling: Indices of the mini-batch samples used for curvature.
            Default: ``None`` (all).
        grad_subsampling: Indices of the samples used for the directional
            gradients; may differ from ``subsampling``. Default: ``None`` (all).
        weight_decay: Decoupled weight decay ``wd >= 0``. Default: ``0.0``.
        track_dampings: Keep a :class:`DampingRecord` per group and step in
            :attr:`damping_history`. Default: ``False``.

    Raises:
        TypeError: If ``damping`` is neither callable nor a number, or a
            hyperparameter is not a number.
        ValueError: On a non-positive ``lr``, negative ``weight_decay`` or options
            that :class:`vivitlib.LowRankGGN` rejects.
    """

    def __init__(
        self,
        params: Iterable[Any],
        damping: Callable[[Tensor, Tensor], Tensor] | float | None = None,
        lr: float = 1.0,
        *,
        mc_samples: int = 1,
        subsampling: Sequence[int] | Tensor | None = None,
        grad_subsampling: Sequence[int] | Tensor | None = None,
        weight_decay: float = 0.0,
        track_dampings: bool = False,
    ) -> None:
        damping = BootstrapDamping() if damping is None else damping
        defaults = {"lr": lr, "damping": _as_strategy(damping)}
        defaults["weight_decay"] = weight_decay
        _check_hyperparameters(defaults)
        self._ggn_options = {
            "mc_samples": mc_samples,
            "subsampling": subsampling,
            "grad_subsampling": grad_subsampling,
            "compute": _COMPUTE,
        }
        super().__init__(params, defaults)
        self.track_dampings = bool(track_dampings)
        self.damping_history: list[DampingRecord] = []
        self._num_steps = 0
        self._ggn = self._build_ggn()

    def _build_ggn(self) -> LowRankGGN:
        groups = [{"params": group["params"]} for group in self.param_groups]
        return LowRankGGN(groups, **self._ggn_options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (re-read :attr:`extensions` and :attr:`hook` after).

        Args:
            param_group: Dict with ``"params"`` and optional per-group ``"lr"``,
                ``"damping"`` and ``"weight_decay"``.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group)}.")
        param_group = dict(param_group)
        if "damping" in param_group:
            param_group["damping"] = _as_strategy(param_group["damping"])
        _check_hyperparameters(param_group)
        super().add_param_group(param_group)
        if hasattr(self, "_ggn"):
            self._ggn = self._build_ggn()

    @property
    def ggn(self) -> LowRankGGN:
        """The :class:`~vivitlib.LowRankGGN` over the optimizer's groups."""
        return self._ggn

    @property
    def extensions(self) -> tuple:
        """BackPACK extensions for ``with backpack(*opt.extensions, ...)``."""
        return self._ggn.extensions

    @property
    def hook(self) -> Callable:
        """Extension hook for ``backpack(..., extension_hook=opt.hook)``."""
        return self._ggn.hook

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Apply one damped Newton step to every parameter group.

        Args:
            closure: Optional; called inside ``backpack(*self.extensions,
                extension_hook=self.hook)`` with gradients enabled, it must compute
                the loss and call ``backward()`` on it. Default: ``None`` (use the
                backward pass that ran before this call).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: If no curvature from a backward pass inside
                ``backpack(*opt.extensions, extension_hook=opt.hook)`` is available.
            ValueError: If a damping strategy returns a wrong shape or NaN/negative
                values.
        """
        loss = None
        if closure is not None:
            with (
                torch.enable_grad(),
                backpack(*self.extensions, extension_hook=self.hook),
            ):
                loss = closure()
        try:
            blocks = self._ggn.blocks
        except RuntimeError as err:
            if str(err).startswith("No curvature"):
                raise RuntimeError(
                    "DampedNewton.step() found no curvature from a backward pass. "
                    + _HINT
                ) from err
            raise
        try:
            updates = []
            for index, (group, block) in enumerate(zip(self.param_groups, blocks)):
                updates.append(self._group_update(index, group, block))
        finally:
            self._ggn.reset()
        for group, update in zip(self.param_groups, updates):
            for param in group["params"]:
                self.state[param]["step"] = self.state[param].get("step", 0) + 1
            if update is None:
                continue
            decay = 1.0 - group["lr"] * group["weight_decay"]
            for param, delta in zip(group["params"], update):
                if decay != 1.0:
                    param.mul_(decay)
                param.add_(delta.to(param.dtype), alpha=group["lr"])
        self._num_steps += 1
        return loss

    def _group_update(
        self, index: int, group: dict[str, Any], block: Any
    ) -> list[Tensor] | None:
        """Compute a group's (undamped-by-lr) step, or ``None`` for no change."""
        if block.num_directions == 0:
            self._warn(index, "the GGN has no direction with positive curvature")
            dampings, update = block.evals.new_zeros(0), None
        else:
            strategy = group["damping"]
            dampings = strategy(block.gammas, block.lambdas)
            dampings = self._check_dampings(dampings, block.num_directions, strategy)
            update = None
            if not bool(torch.isfinite(dampings).any()):
                self._warn(index, "the damping strategy rejected every direction")
            else:
                update = block.newton_step(dampings)
                if not all(bool(torch.isfinite(u).all()) for u in update):
                    self._warn(index, "the step is not finite")
                    update = None
        applied = update is not None
        if self.track_dampings:
            record = DampingRecord(
                step=self._num_steps,
                group=index,
                evals=block.evals.detach().cpu().clone(),
                gamma_means=block.gamma_means.detach().cpu().clone(),
                dampings=dampings.detach().cpu().clone(),
                applied=applied,
            )
            self.damping_history.append(record)
        return update

    @staticmethod
    def _check_dampings(dampings: Any, num_directions: int, strategy: Any) -> Tensor:
        if not isinstance(dampings, Tensor):
            raise TypeError(
                f"The damping strategy {strategy!r} returned {type(dampings)}; it "
                f"must return a tensor of shape [{num_directions}]."
            )
        if dampings.shape != (num_directions,):
            raise ValueError(
                f"The damping strategy {strategy!r} returned shape "
                f"{tuple(dampings.shape)}; expected [{num_directions}] (one per "
                "direction)."
            )
        if bool(torch.isnan(dampings).any()) or bool((dampings < 0).any()):
            raise ValueError(
                f"The damping strategy {strategy!r} returned NaN or negative "
                "dampings; return values >= 0 (inf for no step)."
            )
        return dampings

    def _warn(self, index: int, reason: str) -> None:
        warnings.warn(
            f"DampedNewton: {reason} in parameter group {index}; its parameters "
            "are left unchanged in this step.",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, with each group's damping strategy state.

        The strategy objects themselves are not stored (they may hold
        un-picklable generators); ``"damping_states"`` holds their
        ``state_dict()``, e.g. the generator state of
        :class:`~vivitlib.optim.BootstrapDamping`, so that a loaded optimizer
        reproduces the next step exactly.

        Returns:
            A dictionary for :meth:`load_state_dict`, loadable by ``torch.load``
            with ``weights_only=True``.
        """
        state = super().state_dict()
        state["param_groups"] = [
            {key: value for key, value in group.items() if key != "damping"}
            for group in state["param_groups"]
        ]
        state["damping_states"] = [
            {
                "type": type(group["damping"]).__name__,
                "state": _strategy_state(group["damping"]),
            }
            for group in self.param_groups
        ]
        state["num_steps"] = self._num_steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, keeping this optimizer's strategies.

        Args:
            state_dict: Dictionary returned by :meth:`state_dict`.

        Raises:
            ValueError: If the number of groups or the strategy types differ.
        """
        state_dict = dict(state_dict)
        damping_states = state_dict.pop("damping_states", None)
        num_steps = state_dict.pop("num_steps", self._num_steps)
        strategies = [group["damping"] for group in self.param_groups]
        if damping_states is not None and len(damping_states) != len(strategies):
            raise ValueError(
                f"state_dict has {len(damping_states)} damping states for "
                f"{len(strategies)} parameter groups."
            )
        for strategy, saved in zip(strategies, damping_states or []):
            if saved["type"] != type(strategy).__name__:
                raise ValueError(
                    f"state_dict holds a {saved['type']} damping state, but this "
                    f"optimizer uses {type(strategy).__name__}; create the optimizer "
                    "with the same damping strategy type."
                )
        super().load_state_dict(state_dict)
        for group, strategy in zip(self.param_groups, strategies):
            group["damping"] = strategy
        for strategy, saved in zip(strategies, damping_states or []):
            if hasattr(strategy, "load_state_dict"):
                strategy.load_state_dict(saved["state"])
        self._num_steps = int(num_steps)


def _caller_stacklevel() -> int:
    """Stack level of the first frame outside vivitlib and torch (for warnings)."""
    frame, level = inspect.currentframe(), 0
    skip = (str(Path(__file__).parents[1]), str(Path(torch.__file__).parent))
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return max(level, 1)


def _strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's ``state_dict()`` if it has one, else ``{}``."""
    return strategy.state_dict() if hasattr(strategy, "state_dict") else {}
