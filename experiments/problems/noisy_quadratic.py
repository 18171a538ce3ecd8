"""Noisy quadratic of the ViViT paper (Section 4.2, Figure 3) and its optimizers.

Problem. ``L(θ) = θᵀ G θ`` with ``G = diag(1², 2², …, D²)`` (``D = 20``), started at
``θ₀ = 100 · 1``. The optimizers see the unit vectors ``e_k`` as eigen-directions;
along them the true derivatives are ``γ_k(θ) = ∂L/∂θ_k = 2 k² θ_k`` and
``λ_k = e_kᵀ ∇²L e_k = 2 k²``.

Noise models. Each step draws ``N`` (default 128) per-sample observations, independent
across samples, directions and steps (``noise=``):

* ``"gaussian"`` (default, the ViViT study): ``γ_nk = γ_k(θ) + σ_γ ξ_nk`` with
  ``ξ_nk ~ N(0, 1)`` — unbiased, variance ``σ_γ²`` (default ``2·10⁴``, the original
  study's level after the curvature doubling ``λ_k = 2k²``); and
  ``λ_nk ~ Gamma(shape = λ_k² / σ_λ², scale = σ_λ² / λ_k)`` — positive, unbiased
  (mean ``λ_k``), variance ``σ_λ²`` (default ``200``). Along the flattest direction
  (``λ_1 = 2``) single curvatures are then heavily skewed and the batch mean ``λ̄_1``
  now and then falls close to zero: weakly damped steps blow up there.
* ``"heavy_tailed"``: gradients as above; curvatures ``λ_nk = λ_k W_nk`` with a
  Pareto factor ``W`` of tail index ``tail_index`` (default ``2.5``: finite mean 1,
  infinite variance beyond the second moment's edge), so a few samples carry most
  of the curvature and most batches underestimate it.
* ``"growing"``: as ``"gaussian"``, but the gradient noise grows near the minimum,
  ``σ_γ,k² = σ_γ² (1 + growth / (1 + θ_k²))`` (default ``growth = 9``: ten times
  the variance at ``θ_k = 0``).

The signal-to-noise ratio is lowest along flat directions and near the minimum.
Gradient and curvature samples of a step form one batch (``N_g = N_c = N``), so
the bootstrap resamples them jointly.

Optimizers (all update along the unit directions):

* SGD: ``θ ← θ - lr · γ̄``;
* damped Newton: ``θ_k ← θ_k - lr · γ̄_k / (λ̄_k + δ_k)`` with ``δ_k`` from a
  :class:`~vivitlib.optim.ConstantDamping` or :class:`~vivitlib.optim.BootstrapDamping`
  strategy (``δ_k = inf``: no step), ``γ̄_k, λ̄_k`` the means over the ``N`` samples.
  One strategy object serves a whole run, so strategies that carry estimates
  across steps (the default bootstrap rule) see the directions in the same order
  at every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from vivitlib.optim import BootstrapDamping, ConstantDamping
from vivitlib.optim.safeguards import StepControl

#: Noise models of :class:`NoisyQuadratic`.
NOISE_MODELS = ("gaussian", "heavy_tailed", "growing")


@dataclass(frozen=True)
class NoisyQuadratic:
    """Settings of the noisy quadratic.

    Attributes:
        dim: Number of parameters ``D``. Default: ``20``.
        batch_size: Number ``N`` of noisy observations per step. Default: ``128``.
        gamma_var: Variance ``σ_γ²`` of a per-sample gradient. Default: ``2e4``.
        lambda_var: Variance ``σ_λ²`` of a per-sample curvature. Default: ``200``.
        init: Initial value of every coordinate. Default: ``100``.
        noise: ``"gaussian"``, ``"heavy_tailed"`` or ``"growing"`` (module doc).
        tail_index: Pareto index of ``"heavy_tailed"`` curvatures. Default ``2.5``.
        growth: Noise growth of ``"growing"`` at the minimum. Default ``9``.

    """

    dim: int = 20
    batch_size: int = 128
    gamma_var: float = 2e4
    lambda_var: float = 200.0
    init: float = 100.0
    noise: str = "gaussian"
    tail_index: float = 2.5
    growth: float = 9.0

    def __post_init__(self) -> None:
        """Validate the settings."""
        if self.dim < 1 or self.batch_size < 1:
            raise ValueError(
                f"dim and batch_size must be >= 1, got {self.dim}, {self.batch_size}."
            )
        if self.gamma_var < 0 or self.lambda_var < 0:
            raise ValueError(
                f"variances must be >= 0, got {self.gamma_var}, {self.lambda_var}."
            )
        if self.noise not in NOISE_MODELS:
            raise ValueError(
                f"noise must be one of {NOISE_MODELS}, got {self.noise!r}."
            )
        if not self.tail_index > 1 or not self.growth >= 0:
            raise ValueError("tail_index must be > 1 and growth >= 0.")

    @property
    def curvatures(self) -> np.ndarray:
        """True directional curvatures ``λ_k = 2 k²``, shape ``[D]``."""
        return 2.0 * np.arange(1, self.dim + 1, dtype=np.float64) ** 2

    def loss(self, theta: np.ndarray) -> float:
        """Noise-free loss ``θᵀ G θ = ½ Σ_k λ_k θ_k²``."""
        return float(0.5 * np.sum(self.curvatures * theta**2))

    def observe(
        self, theta: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw noisy per-sample directional derivatives at ``θ``.

        Args:
            theta: Current parameters, shape ``[D]``.
            rng: Source of the noise.

        Returns:
            ``gammas`` and ``lambdas``, each of shape ``[N, D]``.

        """
        shape = (self.batch_size, self.dim)
        lam = self.curvatures
        variance = np.full(self.dim, self.gamma_var)
        if self.noise == "growing":
            variance = variance * (1.0 + self.growth / (1.0 + theta**2))
        gammas = lam * theta + np.sqrt(variance) * rng.standard_normal(shape)
        if self.noise == "heavy_tailed":
            alpha = self.tail_index
            pareto = rng.uniform(size=shape) ** (-1.0 / alpha)  # Pareto(α), x >= 1
            lambdas = lam * pareto * (alpha - 1.0) / alpha  # mean λ_k
        elif self.lambda_var == 0:
            lambdas = np.broadcast_to(lam, shape).copy()
        else:
            lambdas = rng.gamma(lam**2 / self.lambda_var, self.lambda_var / lam, shape)
        return gammas, lambdas

    def to_dict(self) -> dict:
        """Return the settings as a plain dictionary."""
        return asdict(self)


def optimizer_names(constant_dampings: list[float]) -> list[str]:
    """Names of the compared optimizers, in plotting order.

    Args:
        constant_dampings: Dampings of the constant-damping runs.

    Returns:
        ``["SGD", "constant_1e-02", …, "bootstrap", "bootstrap_safeguarded"]``;
        ``bootstrap_safeguarded`` adds :class:`DampedNewton`'s default safeguards
        (:class:`~vivitlib.optim.safeguards.StepControl`; the batch loss is the
        batch's quadratic, so the model always fits: ``ρ = 1``).

    """
    constants = [f"constant_{d:.3g}" for d in constant_dampings]
    return ["SGD", *constants, "bootstrap", "bootstrap_safeguarded"]


#: Variants of :class:`~vivitlib.optim.BootstrapDamping` by optimizer name.
BOOTSTRAP_VARIANTS = {
    "bootstrap": {},  # the default rule (shrinkage, estimates carried over steps)
    "bootstrap_safeguarded": {},
    "bootstrap_percentile": {"rule": "percentile"},  # the ViViT paper's rule
    "bootstrap_no_history": {"history": False},  # shrinkage from each batch alone
}


def make_damping(name: str, seed: int, num_candidates: int):
    """Damping strategy for an optimizer name (``None`` for SGD).

    Args:
        name: ``"SGD"``, ``"constant_<δ>"`` or a key of :data:`BOOTSTRAP_VARIANTS`.
        seed: Seed of the bootstrap generator.
        num_candidates: Size of the bootstrap grid ``10**linspace(-4, 2, ·)``.

    Returns:
        A damping strategy or ``None``.

    Raises:
        ValueError: For an unknown name.

    """
    if name == "SGD":
        return None
    if name.startswith("constant_"):
        return ConstantDamping(float(name.removeprefix("constant_")))
    if name in BOOTSTRAP_VARIANTS:
        grid = 10.0 ** torch.linspace(-4, 2, num_candidates, dtype=torch.float64)
        return BootstrapDamping(
            candidates=grid, generator=seed, **BOOTSTRAP_VARIANTS[name]
        )
    raise ValueError(
        f"unknown optimizer {name!r}: use 'SGD', 'constant_<delta>' or one of "
        f"{sorted(BOOTSTRAP_VARIANTS)}."
    )


def run(
    problem: NoisyQuadratic,
    name: str,
    seed: int,
    steps: int,
    sgd_lr: float = 1e-3,
    newton_lr: float = 1.0,
    num_candidates: int = 61,
) -> pd.DataFrame:
    """Optimize the noisy quadratic with one optimizer and one seed.

    The noise uses ``numpy.random.default_rng(seed)``, so every optimizer sees the
    same noise draws for a given seed (common random numbers).

    Args:
        problem: The noisy quadratic.
        name: Optimizer name (see :func:`optimizer_names`).
        seed: Random seed of noise and bootstrap.
        steps: Number of optimization steps.
        sgd_lr: Learning rate of SGD. Default: ``1e-3``.
        newton_lr: Learning rate of damped Newton. Default: ``1.0``.
        num_candidates: Size of the bootstrap grid. Default: ``61``.

    Returns:
        One row per step ``0..steps`` with columns ``optimizer, seed, step, loss,
        distance`` and ``damping_1..damping_D`` (the dampings used for the step
        taken *from* that row's iterate; ``NaN`` for SGD and the last row).

    """
    rng = np.random.default_rng(seed)
    damping = make_damping(name, seed, num_candidates)
    control = StepControl() if name == "bootstrap_safeguarded" else None
    theta = np.full(problem.dim, problem.init, dtype=np.float64)
    rows = []
    for step in range(steps + 1):
        row = {"step": step, "loss": problem.loss(theta)}
        row["distance"] = float(np.linalg.norm(theta))
        dampings = np.full(problem.dim, np.nan)
        if step < steps and np.all(np.isfinite(theta)):
            gammas, lambdas = problem.observe(theta, rng)
            g_mean, l_mean = gammas.mean(0), lambdas.mean(0)
            if damping is None:
                theta = theta - sgd_lr * g_mean
            else:
                dampings = damping(torch.from_numpy(gammas), torch.from_numpy(lambdas))
                if control is not None:
                    plan = control.plan(
                        torch.from_numpy(g_mean), torch.from_numpy(l_mean), dampings,
                        newton_lr,
                    )  # fmt: skip
                    theta = theta + plan.coefficients.numpy()
                    control.update(1.0, plan)
                    dampings = plan.dampings.numpy()
                else:
                    dampings = dampings.numpy()
                    with np.errstate(divide="ignore", invalid="ignore"):
                        coeff = np.where(
                            np.isinf(dampings), 0.0, 1.0 / (l_mean + dampings)
                        )
                    theta = theta - newton_lr * coeff * g_mean
        row.update({f"damping_{k + 1}": d for k, d in enumerate(dampings)})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.insert(0, "seed", seed)
    frame.insert(0, "optimizer", name)
    return frame
