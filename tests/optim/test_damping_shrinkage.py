"""Tests of BootstrapDamping's shrinkage rule against a scalar numpy reference."""

import math

import numpy as np
import pytest
import torch

from vivitlib.optim.damping import BootstrapDamping


class ReferenceShrinkage:
    """The shrinkage rule written out one direction at a time in numpy."""

    def __init__(self, memory=0.95, floor=1e-4):
        self.memory, self.floor = memory, floor
        self.past = {}  # direction -> dict of scalars

    def __call__(self, gammas, lambdas):
        gammas, lambdas = np.asarray(gammas), np.asarray(lambdas)
        dampings, past = [], {}
        for k in range(gammas.shape[1]):
            dampings.append(self._direction(gammas[:, k], lambdas[:, k], k, past))
        self.past = past
        return np.array(dampings)

    def rejected(self):
        """The last step was undone: the observed gradient is still there."""
        for past in self.past.values():
            past["prior"], past["step"] = past["rejected"], 0.0

    def _direction(self, g_n, l_n, k, new_past):
        n_g, n_c = len(g_n), len(l_n)
        g, lam = g_n.mean(), l_n.mean()
        noise = np.sum((g_n - g) ** 2) / n_g**2  # ideal bootstrap variance
        lam_var = np.sum((l_n - lam) ** 2) / n_c**2
        old = self.past.get(k)
        still = (0.0, 0.0, 0.0)  # signed sum, noise sum, count since the last step
        if old is None:
            c_sum, c_weight, c_var, secant, power = lam, 1.0, lam_var, 0.0, None
        else:
            if old["step"] == 0:
                still = old["still"]
            m = self.memory
            c_sum = m * old["sum"] + lam
            c_weight = m * old["weight"] + 1.0
            c_var = m**2 * old["var"] + lam_var
            bound = 0.0
            if old["step"] > 0:
                rise = (
                    abs(g)
                    - abs(old["g"])
                    - 3.0 * (math.sqrt(noise) + math.sqrt(old["noise"]))
                )
                bound = max(rise / old["step"], 0.0)
            secant = max(0.95 * old["secant"], bound)
            power = old["prior"]
        observed = g**2 - noise
        if power is None or observed > 30.0 * (power + noise):
            power = observed
        still = (still[0] + g, still[1] + noise, still[2] + 1.0)
        if old is not None and old["step"] == 0:  # same gradient seen again
            power = max(power, (still[0] / still[2]) ** 2 - still[1] / still[2] ** 2)
        power = max(power, 0.0)
        curvature = max(c_sum / c_weight, secant)
        curv_var = c_var / c_weight**2
        signal = power / (power + noise) if power > 0 else 0.0
        ratio = curv_var / curvature**2
        shrink = signal * (1 + ratio) / (1 + 3 * ratio)
        if shrink > 0 and curvature > 0:
            delta = max(curvature / shrink - lam, self.floor)
            step = -g / (lam + delta)
        else:
            delta, step = math.inf, 0.0
        mean_next = signal * g + (curvature if curvature > 0 else 0.0) * step
        prior = mean_next**2 + signal * noise + curv_var * step**2
        new_past[k] = {"sum": c_sum, "weight": c_weight, "var": c_var,
                       "secant": secant, "prior": prior, "g": g, "noise": noise,
                       "step": abs(step), "still": still,
                       "rejected": signal**2 * g**2 + signal * noise}  # fmt: skip
        return delta


def batches(num_steps, n_g=16, n_c=12, k=4, seed=0):
    """Per-sample derivatives of a few steps: varied signal, noise and curvature."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(num_steps):
        signal = np.array([5.0, 0.3, -2.0, 0.05]) * 0.6**step
        gammas = signal + np.array([1.0, 1.0, 0.5, 2.0]) * rng.standard_normal((n_g, k))
        lambdas = rng.gamma(np.array([0.5, 4.0, 2.0, 0.2]), 1.0, (n_c, k))
        if step == 0:  # no signal at all along the last direction: no step
            gammas[:, 3] -= gammas[:, 3].mean()
        if step == 2:  # the gradient jumps: prediction refuted, secant bound
            gammas[:, 0] += 400.0
        out.append((torch.from_numpy(gammas), torch.from_numpy(lambdas)))
    return out


def test_matches_reference_over_steps():
    strategy, reference = BootstrapDamping(), ReferenceShrinkage()
    seen_inf = seen_finite = False
    longest_still = 0.0
    for gammas, lambdas in batches(6):
        got = strategy(gammas, lambdas)
        expected = torch.from_numpy(reference(gammas.numpy(), lambdas.numpy()))
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=0)
        seen_inf |= bool((~finite).any())
        seen_finite |= bool(finite.any())
        longest_still = max(
            longest_still, *(p["still"][2] for p in reference.past.values())
        )
    assert seen_inf and seen_finite  # both branches were exercised
    assert longest_still >= 2  # the evidence of an unmoved direction was pooled
    assert reference.past[0]["secant"] > 0  # the secant bound was exercised


def test_rejected_step_keeps_the_gradient():
    data = batches(4, seed=6)
    strategy, reference = BootstrapDamping(), ReferenceShrinkage()
    strategy.step_rejected()  # before any call: nothing to correct
    for i, (gammas, lambdas) in enumerate(data):
        got = strategy(gammas, lambdas)
        expected = torch.from_numpy(reference(gammas.numpy(), lambdas.numpy()))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
        if i in (1, 2):
            strategy.step_rejected()
            strategy.step_rejected()  # twice: the same
            reference.rejected()
    # a rejected step is not the same as a taken one
    taken = BootstrapDamping()
    for gammas, lambdas in data:
        last = taken(gammas, lambdas)
    assert not torch.equal(last, got)


def test_memory_and_floor_are_used():
    strategy = BootstrapDamping(candidates=[0.5, 10.0], memory=0.5)
    reference = ReferenceShrinkage(memory=0.5, floor=0.5)
    for gammas, lambdas in batches(3, seed=1):
        got = strategy(gammas, lambdas)
        expected = torch.from_numpy(reference(gammas.numpy(), lambdas.numpy()))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
        assert bool((got >= 0.5).all())


def test_noise_free_quadratic_gets_no_damping():
    """Exact derivatives: the rule returns the floor, i.e. the exact Newton step."""
    gammas = torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.float64).repeat(8, 1)
    lambdas = torch.tensor([[2.0, 0.5, 8.0]], dtype=torch.float64).repeat(8, 1)
    strategy = BootstrapDamping(candidates=[0.0])
    assert torch.equal(strategy(gammas, lambdas), torch.zeros(3, dtype=torch.float64))


def test_pure_noise_takes_no_step():
    gen = torch.Generator().manual_seed(0)
    gammas = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    gammas = gammas - gammas.mean(0)  # mean exactly zero: no signal
    lambdas = torch.ones(64, 3, dtype=torch.float64)
    assert torch.isinf(BootstrapDamping()(gammas, lambdas)).all()


def test_direction_judged_flat_is_taken_up_again():
    """Repeated evidence along a direction without a step adds up."""
    base = torch.tensor([-1.0, 1.0] * 8, dtype=torch.float64)[:, None]
    sd = 0.25  # ideal bootstrap standard error of the mean: sqrt(16 / 16**2)
    lambdas = torch.ones(16, 1, dtype=torch.float64)
    weak, stronger = base + 0.5 * sd, base + 0.9 * sd  # each alone: no evidence
    assert torch.isinf(BootstrapDamping()(stronger, lambdas)).all()
    strategy = BootstrapDamping()
    assert torch.isinf(strategy(weak, lambdas)).all()
    # pooled means 0.7 sd with noise sd²/2: still nothing; then 0.77 sd vs sd²/3
    assert torch.isinf(strategy(stronger, lambdas)).all()
    assert bool(torch.isfinite(strategy(stronger, lambdas)).all())


def test_noisier_direction_gets_larger_damping():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(256, 2, generator=gen, dtype=torch.float64)
    noise = (noise - noise.mean(0)) / noise.std(0)
    gammas = 1.0 + noise * torch.tensor([1.0, 8.0], dtype=torch.float64)
    lambdas = torch.ones(256, 2, dtype=torch.float64)
    dampings = BootstrapDamping()(gammas, lambdas)
    assert dampings[1] > 10 * dampings[0]


def test_state_dict_round_trip_reproduces_next_damping():
    data = batches(4, seed=2)
    strategy = BootstrapDamping()
    for gammas, lambdas in data[:2]:
        strategy(gammas, lambdas)
    saved = strategy.state_dict()
    copy = {key: value.clone() for key, value in saved["filter_state"].items()}
    expected = [strategy(*batch) for batch in data[2:]]
    fresh = BootstrapDamping(memory=0.2)
    fresh.load_state_dict(saved)
    assert fresh.memory == 0.95
    for batch, want in zip(data[2:], expected):
        assert torch.equal(fresh(*batch), want)
    # the saved state is a copy: later calls did not change it
    for key, value in copy.items():
        assert torch.equal(saved["filter_state"][key], value)


def test_number_of_directions_can_change():
    data = batches(3, k=4, seed=3)
    strategy = BootstrapDamping()
    strategy(*data[0])
    # fewer directions: the first two keep their history
    short = strategy(data[1][0][:, :2], data[1][1][:, :2])
    reference = ReferenceShrinkage()
    reference(data[0][0].numpy(), data[0][1].numpy())
    torch.testing.assert_close(
        short,
        torch.from_numpy(reference(data[1][0][:, :2].numpy(), data[1][1][:, :2].numpy())),
        rtol=1e-10, atol=0,
    )  # fmt: skip
    # more directions: the new ones start fresh, like a new strategy
    longer = strategy(*data[2])
    fresh = BootstrapDamping()(data[2][0][:, 2:], data[2][1][:, 2:])
    assert torch.equal(longer[2:], fresh)
    assert strategy.state_dict()["filter_state"]["prior"].numel() == 4


def test_history_false_forgets_between_calls():
    data = batches(3, seed=4)
    strategy = BootstrapDamping(history=False)
    for batch in data:
        assert torch.equal(strategy(*batch), BootstrapDamping()(*batch))


def test_float32_and_empty_directions():
    gammas, lambdas = batches(1)[0]
    got = BootstrapDamping()(gammas.float(), lambdas.float())
    assert got.dtype == torch.float32
    want = BootstrapDamping()(gammas, lambdas)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=0)
    empty = BootstrapDamping()(torch.zeros(4, 0), torch.zeros(4, 0))
    assert empty.shape == (0,)


def test_rule_is_chosen_from_the_options():
    assert BootstrapDamping().rule == "shrinkage"
    assert BootstrapDamping(candidates=[1.0], generator=0).rule == "shrinkage"
    assert BootstrapDamping(percentile=25.0).rule == "percentile"
    assert BootstrapDamping(independent=True).rule == "percentile"
    assert BootstrapDamping(rule="percentile").rule == "percentile"
    assert "shrinkage" in repr(BootstrapDamping())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rule": "median"}, ValueError, "rule must be one of"),
        ({"rule": "shrinkage", "percentile": 5.0}, ValueError, "rule='percentile'"),
        ({"rule": "shrinkage", "independent": True}, ValueError, "independent"),
        ({"memory": 1.5}, ValueError, r"memory must lie in \[0, 1\]"),
        ({"memory": "0.9"}, TypeError, "memory must be a float"),
        ({"history": 1}, TypeError, "history must be a bool"),
    ],
)
def test_bad_settings_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        BootstrapDamping(**kwargs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"rule": "median"}, ValueError, "rule must be one of"),
        ({"memory": -0.1}, ValueError, "memory must lie"),
        ({"filter_state": [1.0]}, TypeError, "filter_state must be a dict"),
        ({"filter_state": {"prior": torch.ones(2)}}, ValueError, "exactly the keys"),
    ],
)
def test_bad_state_raises_and_leaves_strategy_unchanged(change, error, match):
    data = batches(2, seed=5)
    strategy = BootstrapDamping()
    strategy(*data[0])
    before = strategy.state_dict()
    with pytest.raises(error, match=match):
        strategy.load_state_dict({**before, **change})
    after = strategy.state_dict()
    assert after["rule"] == before["rule"] and after["memory"] == before["memory"]
    for key, value in before["filter_state"].items():
        assert torch.equal(after["filter_state"][key], value)


def test_bad_state_tensor_lengths_raise():
    strategy = BootstrapDamping()
    strategy(*batches(1)[0])
    state = strategy.state_dict()
    state["filter_state"]["prior"] = torch.ones(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="same length"):
        strategy.load_state_dict(state)
