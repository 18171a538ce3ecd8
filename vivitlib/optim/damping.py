"""Damping strategies for Newton steps along GGN eigen-directions.

A damping strategy turns per-sample directional derivatives into one damping per
direction. It is any callable with the signature

.. code-block:: python

    strategy(gammas: Tensor[N_g, K], lambdas: Tensor[N_c, K]) -> Tensor[K]

where ``gammas[n, k] = e_kᵀ g_n`` are the per-sample first-order directional
derivatives and ``lambdas[n, k] = e_kᵀ G_n e_k`` the per-sample curvatures along
the ``K`` nontrivial GGN eigenvectors ``e_k`` (``N_g`` and ``N_c`` may differ when
gradients and curvature use different samples). The returned dampings ``δ_k`` enter
the step ``Δθ = -Σ_k γ_k / (λ_k + δ_k) e_k``; ``inf`` means "no step along ``e_k``".

Subclassing :class:`DampingStrategy` is optional; it adds ``state_dict`` /
``load_state_dict`` so that :class:`~vivitlib.optim.DampedNewton` can checkpoint a
strategy's internal state (for instance a random generator).

Reference:
    Dangel, Tatzel, Hennig. ViViT: Curvature access through the generalized
    Gauss-Newton's low-rank structure. TMLR 2022, Section 4.2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vivitlib.linalg.newton import newton_step_sizes
from vivitlib.optim._shrinkage import ShrinkageFilter

__all__ = ["DampingStrategy", "ConstantDamping", "BootstrapDamping"]


def _check_derivatives(gammas: Tensor, lambdas: Tensor) -> None:
    """Validate the per-sample directional derivatives handed to a strategy.

    Args:
        gammas: Per-sample directional gradients, shape ``[N_g, K]``.
        lambdas: Per-sample directional curvatures, shape ``[N_c, K]``.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If shapes are not ``[N, K]`` with matching ``K`` and ``N > 0``.

    """
    for name, value in (("gammas", gammas), ("lambdas", lambdas)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value)}.")
        if value.ndim != 2:
            raise ValueError(
                f"{name} must have shape [N, K] (samples x directions), got shape "
                f"{tuple(value.shape)}."
            )
        if value.shape[0] == 0 and value.shape[1] > 0:
            raise ValueError(f"{name} has no samples (shape {tuple(value.shape)}).")
    if gammas.shape[1] != lambdas.shape[1]:
        raise ValueError(
            "gammas and lambdas must describe the same number of directions K, got "
            f"shapes {tuple(gammas.shape)} and {tuple(lambdas.shape)}."
        )


def _check_keys(state_dict: Any, keys: set[str], name: str) -> None:
    """Raise unless ``state_dict`` is a dict holding ``keys``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{name} state must be a dict, got {type(state_dict)}.")
    missing = keys - set(state_dict)
    if missing:
        raise ValueError(
            f"{name} state lacks {sorted(missing)}; pass the dict returned by "
            "state_dict()."
        )


class DampingStrategy:
    """Base class of damping strategies (optional, see the module docstring).

    Subclasses implement :meth:`__call__`; strategies with internal state override
    :meth:`state_dict` and :meth:`load_state_dict`.
    """

    def __call__(self, gammas: Tensor, lambdas: Tensor) -> Tensor:
        """Compute one damping per direction.

        Args:
            gammas: Per-sample directional gradients ``γ_nk``, shape ``[N_g, K]``.
            lambdas: Per-sample directional curvatures ``λ_nk``, shape ``[N_c, K]``.

        Returns:
            Dampings ``δ_k``, shape ``[K]``; ``inf`` where no step should be taken.

        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's internal state (empty by default).

        Returns:
            A dictionary that :meth:`load_state_dict` accepts.

        """
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore internal state saved by :meth:`state_dict` (no-op by default).

        Args:
            state_dict: Dictionary returned by :meth:`state_dict`.

        """


class ConstantDamping(DampingStrategy):
    """The same damping ``δ`` along every direction.

    Args:
        delta: Non-negative damping ``δ`` (``0.0`` gives undamped Newton steps).

    Raises:
        TypeError: If ``delta`` is not a real number.
        ValueError: If ``delta`` is negative or not finite.

    Example:
        >>> import torch
        >>> ConstantDamping(0.5)(torch.ones(3, 2), torch.ones(4, 2))
        tensor([0.5000, 0.5000])

    """

    def __init__(self, delta: float) -> None:
        self.delta = self._check_delta(delta)

    @staticmethod
    def _check_delta(delta: Any) -> float:
        """Return ``delta`` as a float, or raise if it is not a valid damping."""
        if isinstance(delta, Tensor) and delta.numel() == 1:
            delta = delta.item()
        if isinstance(delta, bool) or not isinstance(delta, int | float):
            raise TypeError(f"delta must be a float, got {type(delta)}.")
        if not math.isfinite(delta) or delta < 0:
            raise ValueError(f"delta must be finite and >= 0, got {delta}.")
        return float(delta)

    def __call__(self, gammas: Tensor, lambdas: Tensor) -> Tensor:
        """Return ``δ`` for each of the ``K`` directions.

        Args:
            gammas: Per-sample directional gradients, shape ``[N_g, K]``.
            lambdas: Per-sample directional curvatures, shape ``[N_c, K]``.

        Returns:
            Tensor of shape ``[K]`` filled with ``δ``.

        """
        _check_derivatives(gammas, lambdas)
        return torch.full(
            (gammas.shape[1],), self.delta, dtype=gammas.dtype, device=gammas.device
        )

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"delta": self.delta}

    @classmethod
    def check_state(cls, state_dict: Any) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``state_dict`` is loadable."""
        _check_keys(state_dict, {"delta"}, cls.__name__)
        cls._check_delta(state_dict["delta"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``delta`` (validated like the constructor's argument).

        Args:
            state_dict: Dictionary returned by :meth:`state_dict`.

        Raises:
            TypeError, ValueError: On a malformed or invalid state; nothing changes.
        """
        self.check_state(state_dict)
        self.delta = self._check_delta(state_dict["delta"])

    def __repr__(self) -> str:  # noqa: D105
        return f"ConstantDamping(delta={self.delta})"


def _linear_percentile(values: Tensor, percentile: float) -> Tensor:
    """Percentile along the first axis with linear interpolation (numpy's default).

    Args:
        values: Samples along dim 0, shape ``[R, ...]``.
        percentile: Percentile in ``[0, 100]``.

    Returns:
        Tensor of shape ``values.shape[1:]``.

    """
    num = values.shape[0]
    position = percentile / 100.0 * (num - 1)
    low = math.floor(position)
    high = min(low + 1, num - 1)
    # only the two order statistics are needed: a partial sort from the near end
    if high < num // 2:
        smallest = values.topk(high + 1, dim=0, largest=False, sorted=True).values
        lower, upper = smallest[low], smallest[high]
    else:
        largest = values.topk(num - low, dim=0, largest=True, sorted=True).values
        lower, upper = largest[num - 1 - low], largest[num - 1 - high]
    frac = position - low
    if frac == 0.0:
        return lower
    return lower + frac * (upper - lower)


class BootstrapDamping(DampingStrategy):
    r"""Noise-aware directional damping from the bootstrap statistics of the batch.

    Two rules; ``rule="shrinkage"`` (default) carries information across steps,
    ``rule="percentile"`` is the ViViT paper's per-step bootstrap.

    **Shrinkage** (default). Let ``γ̄_k, λ̄_k`` be the batch means of ``γ_nk`` and
    ``λ_nk`` and ``σ²_k, ν²_k`` the ideal bootstrap variances of those means
    (``Σ_n (x_n - x̄)² / N²``: the limit of infinitely many resamples). If the true
    directional gradient is ``γ_k`` and the curvature ``λ_k``, the step
    ``-a γ̄_k / λ_k`` that minimises the expected quadratic model has the
    mean-squared-error shrinkage

    .. math::
        a_k = \frac{γ_k^2}{γ_k^2 + σ_k^2} \cdot \frac{1 + r_k}{1 + 3 r_k},
        \qquad r_k = \frac{\operatorname{var} \hat λ_k}{\hat λ_k^2},

    whose second factor accounts for the noise of the curvature estimate
    ``\hat λ_k`` (to second order). The rule returns ``δ_k = \hat λ_k / a_k - λ̄_k``
    (clipped below at the smallest candidate), so the step
    ``-γ̄_k / (λ̄_k + δ_k)`` is that shrunk step; ``inf`` (no step) where
    ``a_k = 0`` or ``\hat λ_k <= 0``. The unknowns are estimated across steps,
    matching directions by their position ``k``:

    * ``γ_k²``: a single batch gives only ``γ̄_k² - σ_k²`` (noisy, clipped at 0).
      After a step the rule predicts the next power from the posterior of a
      zero-mean prior of that power, ``E[γ'²] = (a γ̄ + \hat λ c)² + a σ² +
      \operatorname{var}\hat λ \, c²`` for the step ``c`` it asked for, and uses
      the prediction unless the new batch refutes it (``γ̄_k² - σ_k² > 30 ·
      (prediction + σ_k²)``). Near a minimum this anneals the step like the
      ``1/t`` Robbins--Monro rate, which a constant damping cannot. Along a
      direction that took no step the batch sees the same gradient again, so
      the signed means since the last step are pooled (``(Σγ̄/n)² - Σσ²/n²``),
      and a direction wrongly judged flat is taken up again.
    * ``λ_k``: the batch means averaged with weights ``memory^age``, raised to a
      secant lower bound ``(|γ̄'| - |γ̄| - 3(σ' + σ)) / |c|`` (from how much the
      gradient grew over the last step; it fades by ``0.95`` per step). Averaging
      over steps is what protects the flattest directions from batches with
      skewed curvature samples (a batch mean ``λ̄_k`` near zero).

    The state assumes the step it asked for was taken; if an optimiser shrinks
    the step, the next gradient is larger than predicted, which the rule treats
    conservatively (more damping, or a refuted prediction). An optimiser that
    undoes a step should call :meth:`step_rejected`. When the
    number of directions changes, the first ``min(K_old, K_new)`` directions keep
    their history and new ones start fresh. The state is checkpointed with
    :meth:`state_dict`. ``history=False`` forgets everything between calls (the
    per-step estimates only).

    **Percentile** (``rule="percentile"``). For direction ``k`` and candidate
    damping ``δ`` the step from the batch means is

    .. math::
        s_k(δ) = -\frac{\bar γ_k}{\bar λ_k + δ} .

    Its loss reduction under the quadratic model of a batch with means
    ``(γ*, λ*)`` is

    .. math::
        \mathcal{R}(δ) = -s_k(δ)\, γ^* - \tfrac{1}{2} s_k(δ)^2 λ^* .

    The N per-sample values are resampled with replacement ``num_resamples`` times;
    each resample gives means ``(γ*_r, λ*_r)`` and hence ``R_r(δ)``. The
    ``percentile``-th percentile (linear interpolation) over ``r`` is a confident
    lower bound ``B_k(δ)``. The strategy returns ``δ_k = argmax_δ B_k(δ)`` over the
    candidate grid (the smallest candidate among ties), and ``inf`` (no step) where
    ``max_δ B_k(δ) <= 0``. Candidates with ``λ̄_k + δ <= 0`` are never chosen.

    When ``gammas`` and ``lambdas`` have the same number of rows they are taken to
    be the same samples and resampled with one shared index draw (``paired``);
    otherwise the two sets are resampled independently (first ``gammas``, then
    ``lambdas``). Each resample draws its indices with
    ``torch.randint(N, (num_resamples, N), generator=generator)``, on the CPU.
    All directions, candidates and resamples are evaluated at once; memory is
    ``O(num_resamples · len(candidates) · K)``. This rule decides step by step:
    it cannot average noise over steps, and it cannot see curvature the batch
    missed (heavy-tailed ``λ_nk`` with few samples can make ``λ̄_k`` and all its
    resamples too small).

    Neither rule guards against the quadratic model failing far from ``θ``; the
    optimisers' safeguards do.

    Args:
        candidates: Damping candidates of the percentile rule; the smallest one
            is the shrinkage rule's damping floor. Default: 61 log-spaced values
            ``10**linspace(-4, 2, 61)``.
        percentile: Lower percentile in ``(0, 100)`` used as bound (percentile
            rule). Default: ``None`` (``5.0``).
        num_resamples: Number of bootstrap resamples (percentile rule). Default:
            ``None`` (``100``).
        generator: A CPU ``torch.Generator``, an ``int`` seed, or ``None``. ``None``
            creates a private generator seeded from torch's global generator, so
            ``torch.manual_seed`` makes runs reproducible. Default: ``None``.
        paired: Resample gammas and lambdas with shared indices (percentile
            rule). ``None`` pairs them exactly when they have the same number of
            samples. Default: ``None``.
        independent: Take the steps ``s_k(δ)`` from one random half of the
            samples and bootstrap their reduction on the other half (percentile
            rule; the chosen ``δ`` is used with the full-batch step). Needs ``>= 2``
            samples. Default: ``None`` (``False``).
        rule: ``"shrinkage"`` or ``"percentile"``. ``None`` picks ``"percentile"``
            when one of ``percentile``, ``num_resamples``, ``paired`` or
            ``independent`` is given, else ``"shrinkage"``. Default: ``None``.
        memory: Weight ``[0, 1]`` of the previous steps' curvature in the
            shrinkage rule's average (``0``: this batch only). Default: ``0.95``.
        history: Carry the shrinkage rule's estimates across calls. Default:
            ``True``.

    Raises:
        TypeError: If ``generator`` or another setting has the wrong type.
        ValueError: If a candidate is negative or not finite, the grid is empty,
            ``percentile`` is outside ``(0, 100)``, ``num_resamples < 1``,
            ``memory`` is outside ``[0, 1]``, the rule is unknown, or options of
            the percentile rule are given with ``rule="shrinkage"``.

    Example:
        >>> import torch
        >>> strategy = BootstrapDamping(candidates=[0.1, 1.0], rule="percentile",
        ...                             generator=0)
        >>> gammas = torch.ones(8, 2)          # noise-free gradient
        >>> lambdas = torch.ones(8, 2)
        >>> strategy(gammas, lambdas)          # smallest candidate is best
        tensor([0.1000, 0.1000])
        >>> BootstrapDamping(candidates=[0.1])(gammas, lambdas)  # shrinkage: floor
        tensor([0.1000, 0.1000])

    """

    #: The damping rules.
    RULES = ("shrinkage", "percentile")

    def __init__(
        self,
        candidates: Sequence[float] | Tensor | None = None,
        percentile: float | None = None,
        num_resamples: int | None = None,
        generator: torch.Generator | int | None = None,
        paired: bool | None = None,
        independent: bool | None = None,
        rule: str | None = None,
        memory: float = 0.95,
        history: bool = True,
    ) -> None:
        if candidates is None:
            candidates = 10.0 ** torch.linspace(-4, 2, 61, dtype=torch.float64)
        given = {
            name: value
            for name, value in (
                ("percentile", percentile),
                ("num_resamples", num_resamples),
                ("paired", paired),
                ("independent", independent),
            )  # fmt: skip
            if value is not None
        }
        self.rule = self._check_rule(rule, given)
        self.candidates, self.percentile, self.num_resamples = self._check_settings(
            candidates,
            5.0 if percentile is None else percentile,
            100 if num_resamples is None else num_resamples,
        )
        if paired is not None and not isinstance(paired, bool):
            raise TypeError(f"paired must be a bool or None, got {type(paired)}.")
        if independent is not None and not isinstance(independent, bool):
            raise TypeError(f"independent must be a bool, got {type(independent)}.")
        self.memory, history = self._check_filter_settings(memory, history)
        self.paired = paired
        self.independent = bool(independent)
        self.generator = self._make_generator(generator)
        self._filter = ShrinkageFilter(self.memory, history)

    @classmethod
    def _check_rule(cls, rule: Any, given: dict[str, Any]) -> str:
        """The rule to use, checked against the options given for it."""
        if rule is None:
            return "percentile" if given else "shrinkage"
        if rule not in cls.RULES:
            raise ValueError(f"rule must be one of {cls.RULES}, got {rule!r}.")
        if rule == "shrinkage" and given:
            raise ValueError(
                f"{sorted(given)} apply to rule='percentile' only; drop them or "
                "pass rule='percentile'."
            )
        return rule

    @staticmethod
    def _check_filter_settings(memory: Any, history: Any) -> tuple[float, bool]:
        """Validate ``memory`` and ``history`` of the shrinkage rule."""
        if isinstance(memory, bool) or not isinstance(memory, int | float):
            raise TypeError(f"memory must be a float, got {type(memory)}.")
        if not 0.0 <= memory <= 1.0:
            raise ValueError(f"memory must lie in [0, 1], got {memory}.")
        if not isinstance(history, bool):
            raise TypeError(f"history must be a bool, got {type(history)}.")
        return float(memory), history

    @property
    def history(self) -> bool:
        """Whether the shrinkage rule carries its estimates across calls."""
        return self._filter.history

    @staticmethod
    def _check_settings(
        candidates: Any, percentile: Any, num_resamples: Any
    ) -> tuple[Tensor, float, int]:
        """Validate the settings (constructor and :meth:`load_state_dict`).

        Returns:
            Sorted float64 candidates, the percentile and the number of resamples.

        Raises:
            TypeError, ValueError: Naming the bad setting.
        """
        try:
            grid = torch.as_tensor(candidates, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"candidates must be a sequence of floats, got {candidates!r}."
            ) from err
        if grid.numel() == 0:
            raise ValueError("candidates must contain at least one damping.")
        if not torch.isfinite(grid).all() or (grid < 0).any():
            raise ValueError(f"candidates must be finite and >= 0, got {grid}.")
        if isinstance(percentile, bool) or not isinstance(percentile, int | float):
            raise TypeError(f"percentile must be a float, got {type(percentile)}.")
        if not 0.0 < float(percentile) < 100.0:
            raise ValueError(f"percentile must lie in (0, 100), got {percentile}.")
        if isinstance(num_resamples, bool) or not isinstance(num_resamples, int):
            raise TypeError(f"num_resamples must be an int, got {type(num_resamples)}.")
        if num_resamples < 1:
            raise ValueError(f"num_resamples must be >= 1, got {num_resamples}.")
        return grid.sort().values, float(percentile), num_resamples

    @staticmethod
    def _make_generator(generator: torch.Generator | int | None) -> torch.Generator:
        """Return a CPU generator from a generator, a seed, or the global RNG."""
        if isinstance(generator, torch.Generator):
            if generator.device.type != "cpu":
                raise ValueError(
                    "generator must live on the CPU (indices are drawn there), got "
                    f"device {generator.device}."
                )
            return generator
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        elif isinstance(generator, int) and not isinstance(generator, bool):
            seed = generator
        else:
            raise TypeError(
                "generator must be a torch.Generator, an int seed or None, got "
                f"{type(generator)}."
            )
        new = torch.Generator()
        new.manual_seed(seed)
        return new

    def _resample_means(self, values: Tensor, indices: Tensor) -> Tensor:
        """Means of bootstrap resamples via sample counts.

        Args:
            values: Per-sample values, shape ``[N, K]``.
            indices: Drawn sample indices, shape ``[R, N]``.

        Returns:
            Resampled means, shape ``[R, K]``.

        """
        num_resamples, n = indices.shape
        counts = torch.zeros(num_resamples, n, dtype=values.dtype)
        counts.scatter_add_(1, indices, torch.ones_like(counts))
        return counts.to(values.device) @ values / n

    def _halves(
        self, gammas: Tensor, lambdas: Tensor
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Split the samples at random into (step, evaluation) halves."""
        if min(gammas.shape[0], lambdas.shape[0]) < 2:
            raise ValueError(
                "independent=True splits the samples in two and needs at least 2 "
                f"gamma and 2 lambda samples, got {gammas.shape[0]} and "
                f"{lambdas.shape[0]}; use independent=False."
            )
        paired = self.paired if self.paired is not None else (
            gammas.shape[0] == lambdas.shape[0]
        )  # fmt: skip
        perm_g = torch.randperm(gammas.shape[0], generator=self.generator)
        perm_c = perm_g if paired else torch.randperm(
            lambdas.shape[0], generator=self.generator
        )  # fmt: skip

        def split(values: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
            half = values.shape[0] // 2
            perm = perm.to(values.device)
            return values[perm[:half]], values[perm[half:]]

        return split(gammas, perm_g), split(lambdas, perm_c)

    def draw_indices(self, num_gammas: int, num_lambdas: int) -> tuple[Tensor, Tensor]:
        """Draw the bootstrap indices for one call (advances the generator).

        Args:
            num_gammas: Number of gradient samples ``N_g``.
            num_lambdas: Number of curvature samples ``N_c``.

        Returns:
            Index tensors of shapes ``[R, N_g]`` and ``[R, N_c]`` (the same tensor
            when the samples are paired).

        """
        shape = (self.num_resamples,)
        paired = self.paired if self.paired is not None else num_gammas == num_lambdas
        if paired and num_gammas != num_lambdas:
            raise ValueError(
                "paired=True needs as many gamma as lambda samples, got "
                f"{num_gammas} and {num_lambdas}. Use paired=None or False."
            )
        idx_g = torch.randint(
            0, num_gammas, shape + (num_gammas,), generator=self.generator
        )
        if paired:
            return idx_g, idx_g
        idx_c = torch.randint(
            0, num_lambdas, shape + (num_lambdas,), generator=self.generator
        )
        return idx_g, idx_c

    def lower_bounds(self, gammas: Tensor, lambdas: Tensor) -> Tensor:
        """Bootstrap lower bounds ``B_k(δ)`` on the quadratic-model loss reduction.

        Args:
            gammas: Per-sample directional gradients ``γ_nk``, shape ``[N_g, K]``.
            lambdas: Per-sample directional curvatures ``λ_nk``, shape ``[N_c, K]``.

        Returns:
            Bounds of shape ``[C, K]`` for the ``C`` sorted candidates; ``-inf``
            where ``λ̄_k + δ <= 0``.

        """
        _check_derivatives(gammas, lambdas)
        step_g, step_c = gammas, lambdas
        if self.independent:
            (step_g, gammas), (step_c, lambdas) = self._halves(gammas, lambdas)
        idx_g, idx_c = self.draw_indices(gammas.shape[0], lambdas.shape[0])
        gamma_boot = self._resample_means(gammas, idx_g)  # [R, K]
        lambda_boot = self._resample_means(lambdas, idx_c)  # [R, K]

        deltas = self.candidates.to(dtype=gammas.dtype, device=gammas.device)
        curvatures = step_c.mean(0)
        valid = curvatures + deltas[:, None] > 0  # [C, K]
        steps = newton_step_sizes(step_g.mean(0), curvatures, deltas[:, None])

        reductions = (
            -steps * gamma_boot[:, None, :] - 0.5 * steps**2 * (lambda_boot[:, None, :])
        )  # [R, C, K]
        bounds = _linear_percentile(reductions, self.percentile)
        return torch.where(valid, bounds, -torch.inf)

    def __call__(self, gammas: Tensor, lambdas: Tensor) -> Tensor:
        """Dampings by the strategy's rule (see the class docstring).

        Args:
            gammas: Per-sample directional gradients ``γ_nk``, shape ``[N_g, K]``.
            lambdas: Per-sample directional curvatures ``λ_nk``, shape ``[N_c, K]``.

        Returns:
            Dampings ``δ_k``, shape ``[K]``; ``inf`` where no step should be taken
            (percentile rule: no candidate has a positive bound; shrinkage rule:
            no signal or no positive curvature).

        """
        _check_derivatives(gammas, lambdas)
        if gammas.shape[1] == 0:
            return gammas.new_zeros(0)
        if self.rule == "shrinkage":
            return self._filter(gammas, lambdas, float(self.candidates[0]))
        bounds = self.lower_bounds(gammas, lambdas)  # [C, K]
        best, choice = bounds.max(dim=0)
        deltas = self.candidates.to(dtype=gammas.dtype, device=gammas.device)
        chosen = deltas[choice]
        return torch.where(best > 0, chosen, torch.inf)

    def step_rejected(self) -> None:
        """Tell the strategy that the step of its last call was not taken.

        An optimiser that undoes a step may call this. The shrinkage rule then
        keeps the gradient it observed (instead of predicting that the step
        removed it) and pools the next batch with it; the percentile rule has no
        state to correct. Calling it twice, or before any call, does nothing.
        """
        self._filter.step_rejected()

    def state_dict(self) -> dict[str, Any]:
        """Return the generator state, the settings and the shrinkage rule's state.

        Returns:
            Dictionary with keys ``generator_state``, ``candidates``,
            ``percentile``, ``num_resamples``, ``independent``, ``rule``,
            ``memory``, ``history`` and ``filter_state`` (per-direction tensors).

        """
        return {
            "generator_state": self.generator.get_state(),
            "candidates": self.candidates.clone(),
            "percentile": self.percentile,
            "num_resamples": self.num_resamples,
            "independent": self.independent,
            "rule": self.rule,
            "memory": self.memory,
            "history": self.history,
            "filter_state": {k: v.clone() for k, v in self._filter.state.items()},
        }

    @classmethod
    def check_state(cls, state_dict: Any) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``state_dict`` is loadable.

        The settings are checked as by the constructor, the generator state must
        be a ``uint8`` tensor a CPU generator accepts. States saved before the
        shrinkage rule existed (no ``rule`` key) load with the current rule.
        """
        keys = {"generator_state", "candidates", "percentile", "num_resamples"}
        _check_keys(state_dict, keys, cls.__name__)
        cls._check_settings(
            state_dict["candidates"],
            state_dict["percentile"],
            state_dict["num_resamples"],
        )
        if "rule" in state_dict:
            cls._check_rule(state_dict["rule"], {})
        cls._check_filter_settings(
            state_dict.get("memory", 0.0), state_dict.get("history", True)
        )
        ShrinkageFilter.check(state_dict.get("filter_state", {}))
        state = state_dict["generator_state"]
        if not isinstance(state, Tensor) or state.dtype != torch.uint8:
            raise TypeError(
                "generator_state must be the uint8 tensor of "
                f"torch.Generator.get_state(), got {type(state)}."
            )
        try:
            torch.Generator().set_state(state.clone())
        except RuntimeError as err:
            raise ValueError(f"generator_state is not a valid state: {err}") from err

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`.

        Args:
            state_dict: Dictionary returned by :meth:`state_dict`.

        Raises:
            TypeError, ValueError: On a malformed state or invalid settings (e.g.
                ``percentile=250``, a NaN or negative candidate); nothing changes.
        """
        self.check_state(state_dict)
        grid, percentile, num_resamples = self._check_settings(
            state_dict["candidates"],
            state_dict["percentile"],
            state_dict["num_resamples"],
        )
        self.generator.set_state(state_dict["generator_state"].clone())
        self.candidates, self.percentile = grid, percentile
        self.num_resamples = num_resamples
        self.independent = bool(state_dict.get("independent", self.independent))
        self.rule = state_dict.get("rule", self.rule)
        self.memory = self._filter.memory = float(state_dict.get("memory", self.memory))
        self._filter.history = bool(state_dict.get("history", self.history))
        self._filter.load(state_dict.get("filter_state", {}))

    def __repr__(self) -> str:  # noqa: D105
        grid = (
            f"candidates=<{self.candidates.numel()} in "
            f"[{self.candidates.min().item():.1e}, {self.candidates.max().item():.1e}]>"
        )
        if self.rule == "shrinkage":
            return (
                f"BootstrapDamping(rule='shrinkage', {grid}, memory={self.memory}, "
                f"history={self.history})"
            )
        return (
            f"BootstrapDamping(rule='percentile', {grid}, percentile="
            f"{self.percentile}, num_resamples={self.num_resamples})"
        )


def as_strategy(damping: Any) -> Any:
    """A damping strategy from a number (:class:`ConstantDamping`) or a callable.

    Args:
        damping: ``δ >= 0``, or a callable ``(gammas [N_g, K], lambdas [N_c, K])
            -> dampings [K]``.

    Returns:
        The strategy.

    Raises:
        TypeError: If ``damping`` is neither a number nor callable.
    """
    if isinstance(damping, int | float) and not isinstance(damping, bool):
        return ConstantDamping(float(damping))
    if not callable(damping):
        raise TypeError(
            "damping must be a damping strategy (callable (gammas, lambdas) -> "
            f"dampings) or a number, got {type(damping)}."
        )
    return damping


def check_dampings(dampings: Any, num_directions: int, strategy: Any) -> Tensor:
    """Check what a strategy returned: a tensor ``[K]`` of values ``>= 0`` or ``inf``.

    Args:
        dampings: The strategy's output.
        num_directions: ``K``.
        strategy: The strategy (named in messages).

    Returns:
        ``dampings``.

    Raises:
        TypeError: If it is not a tensor.
        ValueError: On a wrong shape, NaN or negative entries.
    """
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


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's ``state_dict()`` if it has one, else ``{}``."""
    return strategy.state_dict() if hasattr(strategy, "state_dict") else {}
