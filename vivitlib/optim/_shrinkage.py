"""Bookkeeping of :class:`~vivitlib.optim.BootstrapDamping`'s shrinkage rule.

Per-direction state carried across steps, and the damping that minimises the
expected quadratic model.

The maths is stated on :class:`~vivitlib.optim.BootstrapDamping`; this module
holds its bookkeeping (ideal-bootstrap moments, pooled curvature with a secant
bound, predicted gradient power, the record of an undone step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vivitlib.linalg.newton import newton_step_sizes


def _bootstrap_moments(values: Tensor) -> tuple[Tensor, Tensor]:
    """Means over samples and the ideal bootstrap variance of those means.

    The ideal bootstrap (infinitely many resamples) gives the variance of a
    resample mean in closed form: ``Σ_n (x_n - x̄)² / N²``.

    Args:
        values: Per-sample values, shape ``[N, K]``.

    Returns:
        Means and variances of the means, each of shape ``[K]``.

    """
    mean = values.mean(0)
    return mean, (values - mean).square().mean(0) / values.shape[0]


#: Keys of the shrinkage rule's per-direction state (tensors of shape ``[K]``).
_FILTER_KEYS = ("prior", "curv_sum", "curv_weight", "curv_var", "secant",
                "last_gamma", "last_noise", "last_step", "still_sum", "still_noise",
                "still_count")  # fmt: skip


class ShrinkageFilter:
    r"""Per-direction state and update of :class:`BootstrapDamping`'s shrinkage rule.

    Directions are matched between calls by their position ``k`` (the optimisers
    order them by curvature); see :class:`BootstrapDamping` for the maths.
    Entries of the state are ``NaN`` for directions without history.
    """

    #: A power above ``SURPRISE · (prior + noise)`` replaces the prior.
    SURPRISE = 30.0
    #: Noise margin (in standard errors) of the secant curvature bound.
    SECANT_MARGIN = 3.0
    #: Factor by which the secant bound fades per call.
    SECANT_DECAY = 0.95
    #: Noise multiple subtracted from an observed power (``γ̄² - EVIDENCE σ²``).
    EVIDENCE = 1.0

    def __init__(self, memory: float, history: bool) -> None:
        self.memory, self.history = memory, history
        self.state: dict[str, Tensor] = {}
        self._rejected: dict[str, Tensor] | None = None

    def _past(self, num: int, like: Tensor) -> dict[str, Tensor]:
        """The state for ``num`` directions (``NaN`` beyond the stored ones)."""
        past = {}
        for key in _FILTER_KEYS:
            fresh = like.new_full((num,), math.nan)
            if self.history and key in self.state:
                stored = self.state[key].to(like)[:num]
                fresh[: stored.numel()] = stored
            past[key] = fresh
        return past

    def _curvature(
        self, lam: Tensor, lam_var: Tensor, gamma: Tensor, noise: Tensor, past: dict
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Pooled curvature (raised to the secant bound), its variance, new state."""
        known = ~torch.isnan(past["prior"])
        m = self.memory
        new = {
            "curv_sum": torch.where(known, m * past["curv_sum"], 0.0) + lam,
            "curv_weight": torch.where(known, m * past["curv_weight"], 0.0) + 1.0,
            "curv_var": torch.where(known, m**2 * past["curv_var"], 0.0) + lam_var,
        }
        weight = new["curv_weight"]
        rise = (
            gamma.abs()
            - past["last_gamma"]
            - self.SECANT_MARGIN * (noise.sqrt() + past["last_noise"])
        )
        moved = known & (past["last_step"] > 0)
        bound = torch.where(moved, rise / past["last_step"], 0.0).clamp(min=0.0)
        faded = torch.where(known, self.SECANT_DECAY * past["secant"], 0.0)
        new["secant"] = torch.maximum(faded, bound)
        curvature = torch.maximum(new["curv_sum"] / weight, new["secant"])
        return curvature, new["curv_var"] / weight**2, new

    def _power(
        self, gamma: Tensor, noise: Tensor, past: dict
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Estimate of ``γ_k²`` and the running evidence of unmoved directions.

        The predicted power is used unless the batch refutes it. Along a
        direction that took no step, the batch observes the same gradient again:
        the signed means since the last step are averaged, and their power (if
        larger) is used, so a direction wrongly judged flat is taken up again.
        """
        observed = gamma.square() - self.EVIDENCE * noise
        prior = past["prior"]
        surprise = torch.isnan(prior) | (observed > self.SURPRISE * (prior + noise))
        power = torch.where(surprise, observed, prior)
        still = past["last_step"] == 0  # False where unknown (NaN)
        still_sum = torch.where(still, past["still_sum"], 0.0) + gamma
        still_noise = torch.where(still, past["still_noise"], 0.0) + noise
        count = torch.where(still, past["still_count"], 0.0) + 1.0
        pooled = (still_sum / count).square() - self.EVIDENCE * still_noise / count**2
        power = torch.maximum(power, torch.where(still, pooled, 0.0))
        new = {"still_sum": still_sum, "still_noise": still_noise, "still_count": count}
        return power.clamp(min=0.0), new

    def __call__(self, gammas: Tensor, lambdas: Tensor, floor: float) -> Tensor:
        """Dampings ``δ_k`` for one batch, updating the state (see the class)."""
        gamma, noise = _bootstrap_moments(gammas)
        lam, lam_var = _bootstrap_moments(lambdas)
        past = self._past(gamma.numel(), gamma)
        curvature, curv_var, new = self._curvature(lam, lam_var, gamma, noise, past)
        power, still = self._power(gamma, noise, past)
        signal = torch.where(power > 0, power / (power + noise), 0.0)
        ratio = curv_var / curvature.square()
        shrink = signal * (1 + ratio) / (1 + 3 * ratio)
        ok = (shrink > 0) & (curvature > 0)
        wanted = curvature / torch.where(ok, shrink, 1.0) - lam
        dampings = torch.where(ok, wanted.clamp(min=floor), torch.inf)
        step = newton_step_sizes(gamma, lam, dampings)
        mean_next = signal * gamma + torch.where(ok, curvature, 0.0) * step
        prior = mean_next.square() + signal * noise + curv_var * step.square()
        new.update(prior=prior, last_gamma=gamma.abs(), last_noise=noise.sqrt(),
                   last_step=step.abs(), **still)  # fmt: skip
        self.state = new
        # if the step is undone, the gradient is still there: the posterior power
        self._rejected = {"prior": signal * (signal * gamma.square() + noise)}
        return dampings

    def step_rejected(self) -> None:
        """Record that the last call's step was not taken (see BootstrapDamping)."""
        if self.state and self._rejected is not None:
            prior = self._rejected["prior"].to(self.state["prior"])
            self.state["prior"] = prior
            self.state["last_step"] = torch.zeros_like(prior)
        self._rejected = None

    @staticmethod
    def check(state: Any) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``state`` is a saved state."""
        if not isinstance(state, dict):
            raise TypeError(f"filter_state must be a dict, got {type(state)}.")
        if state and set(state) != set(_FILTER_KEYS):
            raise ValueError(
                f"filter_state must be empty or hold exactly the keys {_FILTER_KEYS}, "
                f"got {sorted(state)}; pass the dict returned by state_dict()."
            )
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.ndim != 1:
                raise TypeError(
                    f"filter_state[{key!r}] must be a 1-d tensor, got {value!r}."
                )
        if len({value.numel() for value in state.values()}) > 1:
            raise ValueError("filter_state tensors must all have the same length.")

    def load(self, state: dict[str, Tensor]) -> None:
        """Restore a state saved from :attr:`state` (checked first)."""
        self.check(state)
        self.state = {key: value.clone() for key, value in state.items()}
        self._rejected = None
