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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from backpack import backpack
from torch import Tensor, nn

from vivitlib import hessianfree
from vivitlib.directional import DirectionalDerivatives
from vivitlib.optim.damped_newton import DampedNewton, _as_strategy, _strategy_state
from vivitlib.optim.damping import BootstrapDamping

_OPERATORS = {"ggn": hessianfree.GGNOperator, "hessian": hessianfree.HessianOperator}
_WHICH = {"ggn": "largest", "hessian": "magnitude"}


@dataclass(frozen=True)
class RefreshRecord:
    """One recomputation of the directions.

    Attributes:
        step: Optimiser step before which the directions were computed.
        eigenvalues: Eigenvalues found, ``[k]`` (signed for the Hessian).
        num_products: Curvature-vector products the refresh spent.
        converged: Whether ``topk_eigh`` met its tolerance.
    """

    step: int
    eigenvalues: Tensor
    num_products: int
    converged: bool


class LanczosDampedNewton(torch.optim.Optimizer):
    """Damped Newton steps along top-``k`` Lanczos directions of a curvature batch.

    Usage::

        opt = LanczosDampedNewton(model, loss_fn, (X_curv, y_curv), k=10)
        for X, y in loader:
            opt.zero_grad()
            with backpack(*opt.extensions, extension_hook=opt.hook):
                loss_fn(model(X), y).backward()
            opt.step()

    Args:
        model: The extended network (``backpack.extend``).
        loss_fn: The extended loss (``'mean'`` or ``'sum'``).
        curvature_data: Data for the refreshes: one ``(X, y)`` batch, a list of
            batches or a non-shuffling ``DataLoader``.
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
        super().__init__(list(params), {"lr": lr, "damping": _as_strategy(damping)})
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
        self.refresh()

    @property
    def params(self) -> list[Tensor]:
        """The optimised parameters."""
        return self.param_groups[0]["params"]

    @property
    def extensions(self) -> tuple:
        """BackPACK extensions for ``with backpack(*opt.extensions, ...)``."""
        return self._collector.extensions

    @property
    def hook(self) -> Callable:
        """Extension hook for ``backpack(..., extension_hook=opt.hook)``."""
        return self._collector.hook

    @torch.enable_grad()
    def refresh(self) -> RefreshRecord:
        """Recompute the top-``k`` directions on the curvature data now."""
        was_training = self._model.training
        self._model.eval()
        try:
            op = _OPERATORS[self.curvature](
                self._model, self._loss_fn, self._data, params=self.params
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
            eigenvalues=result.eigenvalues.detach().cpu(),
            num_products=result.num_products,
            converged=result.converged,
        )
        self.refresh_history.append(record)
        self._set_directions(
            [e.detach().to(p.dtype) for e, p in zip(result.eigenvectors, self.params)],
            result.eigenvalues.detach().to(torch.float64).abs(),
        )
        return record

    def _set_directions(self, directions: list[Tensor], eigenvalues: Tensor) -> None:
        self.directions, self.eigenvalues = directions, eigenvalues
        self._collector = DirectionalDerivatives(
            self.params, directions, **self._dd_options
        )

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
            with (
                torch.enable_grad(),
                backpack(*self.extensions, extension_hook=self.hook),
            ):
                loss = closure()
        try:
            gammas, lambdas = self._collector.gammas, self._collector.lambdas
        except RuntimeError as err:
            raise RuntimeError(
                "LanczosDampedNewton.step() found no directional derivatives; run "
                "the backward pass inside `with backpack(*opt.extensions, "
                "extension_hook=opt.hook):` first."
            ) from err
        finally:
            self._collector.reset()
        if self.step_curvature == "refresh":
            lambdas = lambdas - lambdas.mean(0) + self.eigenvalues
        group = self.param_groups[0]
        strategy = group["damping"]
        dampings = DampedNewton._check_dampings(
            strategy(gammas, lambdas), gammas.shape[1], strategy
        )
        coefficients = self.step_coefficients(gammas, lambdas, dampings)
        for param, direction in zip(self.params, self.directions):
            update = torch.tensordot(coefficients.to(param.dtype), direction, dims=1)
            param.add_(update, alpha=group["lr"])
        self._num_steps += 1
        if self._num_steps % self.refresh_every == 0:
            self.refresh()
        return loss

    @staticmethod
    def step_coefficients(gammas: Tensor, lambdas: Tensor, dampings: Tensor) -> Tensor:
        """Step sizes ``-γ_k / (λ_k + δ_k)`` from sample means, ``[K]``.

        Zero where ``δ_k = inf`` or ``λ_k + δ_k ≤ 0`` (no step along ``d_k``).
        """
        denominator = lambdas.mean(0) + dampings.to(lambdas.dtype)
        coefficients = -gammas.mean(0) / denominator
        skip = ~torch.isfinite(dampings) | (denominator <= 0)
        return torch.where(skip, torch.zeros_like(coefficients), coefficients)

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state with the current directions and the strategy's state."""
        state = super().state_dict()
        state["param_groups"] = [
            {key: value for key, value in g.items() if key != "damping"}
            for g in state["param_groups"]
        ]
        state["directions"] = [d.clone() for d in self.directions]
        state["eigenvalues"] = self.eigenvalues.clone()
        state["num_steps"] = self._num_steps
        state["damping_state"] = _strategy_state(self.param_groups[0]["damping"])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, including the directions (no refresh)."""
        state_dict = dict(state_dict)
        directions = state_dict.pop("directions")
        eigenvalues = state_dict.pop("eigenvalues")
        self._num_steps = int(state_dict.pop("num_steps"))
        damping_state = state_dict.pop("damping_state", {})
        strategy = self.param_groups[0]["damping"]
        super().load_state_dict(state_dict)
        self.param_groups[0]["damping"] = strategy
        if hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(damping_state)
        self._set_directions([d.clone() for d in directions], eigenvalues.clone())
