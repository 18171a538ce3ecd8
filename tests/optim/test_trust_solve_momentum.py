"""The exact trust-region step and the complement momentum (dense references)."""

import pytest
import torch
from backpack import backpack, extend
from scipy.optimize import brentq
from torch import nn

from tests.optim.helpers import make_closure
from tests.reference import dense_curvature
from vivitlib.optim import ConstantDamping, DampedNewton, StepControl


def _problem(n=4, seed=0):
    """Tanh MLP with N·(C-1) = 8 < D = 31: a nontrivial flat complement."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double())
    return model, extend(nn.CrossEntropyLoss()), X, y


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _backward(opt, model, loss_fn, X, y):
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss_fn(model(X), y).backward()


def test_trust_region_step_is_the_exact_subproblem_solution():
    gen = torch.Generator().manual_seed(1)
    evals = 10.0 ** torch.linspace(1, -3, 12, dtype=torch.float64)
    gammas = torch.randn(12, generator=gen, dtype=torch.float64)
    dampings = torch.zeros(12, dtype=torch.float64)
    dampings[3] = torch.inf  # a skipped direction stays skipped
    control = StepControl(initial_damping=0.0, floor=0.0, radius=0.5)
    plan = control.plan(gammas, evals, dampings, lr=1.0)
    radius = 0.5 * float(gammas.norm()) / float(evals.max())
    assert plan.clipped and plan.scale == 1.0

    def excess(nu):  # independent reference: scipy root of ‖c(ν)‖ = r
        keep = torch.arange(12) != 3
        return float((gammas[keep] / (evals[keep] + nu)).norm()) - radius

    nu = brentq(excess, 0.0, 1e6, xtol=1e-14, rtol=1e-14)
    expected = -gammas / (evals + nu)
    expected[3] = 0.0
    torch.testing.assert_close(plan.coefficients, expected, rtol=1e-9, atol=1e-12)
    assert plan.step_norm == pytest.approx(radius, rel=1e-9)
    # the exact step predicts at least the reduction of the scaled-down step
    scaled = StepControl(initial_damping=0.0, floor=0.0, radius=0.5,
                         trust_solve="scale").plan(gammas, evals, dampings, 1.0)  # fmt: skip
    assert scaled.step_norm == pytest.approx(radius, rel=1e-12)
    assert plan.predicted < scaled.predicted < 0
    # "auto" (default): the exact step only where the step is checked (closure)
    unchecked = StepControl(initial_damping=0.0, floor=0.0, radius=0.5).plan(
        gammas, evals, dampings, 1.0, checked=False
    )
    torch.testing.assert_close(unchecked.coefficients, scaled.coefficients)


def test_complement_momentum_matches_dense_heavy_ball():
    model, loss_fn, X, y = _problem()
    eta, beta, delta = 0.3, 0.5, 0.2
    opt = DampedNewton(model.parameters(), ConstantDamping(delta), mc_samples=0,
                       safeguards=False, complement_lr=eta,
                       complement_momentum=beta)  # fmt: skip
    buffer = None
    for _ in range(3):
        dense = dense_curvature(model, loss_fn, X, y)
        evals, evecs = torch.linalg.eigh(dense.ggn)
        keep = evals > 1e-10 * evals.max()
        evals, evecs = evals[keep], evecs[:, keep]
        gammas = evecs.T @ dense.grad
        perp = dense.grad - evecs @ gammas
        buffer = perp if buffer is None else perp + beta * buffer
        expected = _flat(model) - evecs @ (gammas / (evals + delta)) - eta * buffer
        _backward(opt, model, loss_fn, X, y)
        opt.step()
        torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)
    assert all("complement_buffer" in opt.state[p] for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_complement_momentum_restarts_after_an_undone_step_and_round_trips():
    model, loss_fn, X, y = _problem()
    opt = DampedNewton(model.parameters(), complement_momentum=0.9, mc_samples=0)
    closure = make_closure(opt, model, loss_fn, X, y)

    opt.step(closure)
    state = opt.state_dict()
    buffers = [state["state"][i]["complement_buffer"] for i in range(4)]
    assert all(b.shape == p.shape for b, p in zip(buffers, model.parameters()))
    fresh = DampedNewton(model.parameters(), complement_momentum=0.9, mc_samples=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state[model[0].weight]["complement_buffer"], buffers[0])
    # a closure whose loss rises after any move: the step is undone, momentum reset
    calls = []

    def rising():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model(X), y) + (0.0 if len(calls) % 2 else 100.0)
        loss.backward()
        return loss

    params = _flat(model)
    opt.step(rising)
    assert opt.num_rejected == 1 and torch.equal(_flat(model), params)
    assert all("complement_buffer" not in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"complement_momentum": 1.0}, "complement_momentum must lie in"),
        ({"complement_momentum": -0.1}, "complement_momentum must be finite"),
        ({"trust_solve": "clip"}, "trust_solve must be"),
    ],
)
def test_bad_new_options_raise_clearly(kwargs, match):
    model = _problem()[0]
    with pytest.raises(ValueError, match=match):
        DampedNewton(model.parameters(), **kwargs)


def test_checkpoint_from_before_the_momentum_loads_and_steps():
    """A state_dict without ``complement_momentum`` (older versions) gets 0."""
    model, loss_fn, X, y = _problem()
    opt = DampedNewton(model.parameters(), mc_samples=0)
    opt.step(make_closure(opt, model, loss_fn, X, y))
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["complement_momentum"]
    fresh = DampedNewton(model.parameters(), mc_samples=0)
    fresh.load_state_dict(state)
    assert [g["complement_momentum"] for g in fresh.param_groups] == [0.0]
    before = [p.detach().clone() for p in model.parameters()]
    fresh.step(make_closure(fresh, model, loss_fn, X, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
