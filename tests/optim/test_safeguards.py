"""Safeguards of the Newton optimisers on constructed cases (issue 12).

Stated guarantee: with a closure (``opt.step(closure)``) and the defaults, the
batch loss never increases (factor 1): a step that increases it is undone and
the damping grows. Without a closure a bad step is seen one step late.
"""

import math

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from tests.optim.helpers import closure_losses, make_closure
from tests.reference import dense_curvature
from vivitlib.optim import BootstrapDamping, DampedNewton, LanczosDampedNewton
from vivitlib.optim.safeguards import StepControl

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def test_quadratic_with_exact_undamped_step_gets_no_damping():
    torch.manual_seed(0)
    model = extend(nn.Linear(3, 2).double())
    loss_fn = extend(nn.MSELoss())
    X, y = (
        torch.randn(20, 3, dtype=torch.float64),
        torch.randn(20, 2, dtype=torch.float64),
    )
    start = [p.detach().clone() for p in model.parameters()]
    design = torch.cat([X, torch.ones(20, 1, dtype=X.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    # defaults: curvatures within 1/damping_floor = 10 of λ_1 get no damping;
    # the batch (20 samples) is smaller than curvature_samples: all are used
    for options in (
        {"curvature_samples": 32},
        {"curvature_samples": 32, "initial_damping": 1e-3, "damping_floor": 1e-4},
    ):
        with torch.no_grad():
            for param, value in zip(model.parameters(), start):
                param.copy_(value)
        opt = DampedNewton(model.parameters(), 0.0, track_dampings=True, **options)
        mu = opt.controls[0].mu
        opt.step(make_closure(opt, model, loss_fn, X, y))
        (record,) = opt.damping_history
        assert torch.equal(record.dampings, torch.zeros_like(record.dampings))
        assert record.scale == 1.0 and record.applied
        torch.testing.assert_close(model.weight, solution[:-1].T, rtol=0, atol=1e-10)
        # ρ = 1: the global damping goes down (or stays at the floor)
        assert opt.controls[0].mu == max(0.5 * mu, opt.controls[0].floor)


def saturating_problem(theta=3.0):
    """½ (tanh(θ) - 0.9)²: the Gauss-Newton model overshoots from θ = 3."""
    layer = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(theta)
    model = extend(nn.Sequential(layer, nn.Tanh()))
    loss_fn = extend(nn.MSELoss())
    X = torch.ones(1, 1, dtype=torch.float64)
    y = torch.full((1, 1), 0.9, dtype=torch.float64)
    return model, loss_fn, X, y


def test_failing_model_increases_damping_and_loss_never_increases():
    model, loss_fn, X, y = saturating_problem()
    opt = DampedNewton(model.parameters(), 0.0, mc_samples=0, trust_radius=None)
    closure = make_closure(opt, model, loss_fn, X, y)
    losses, mus = [loss_fn(model(X), y).item()], [opt.controls[0].mu]
    for _ in range(30):
        opt.step(closure)
        losses.append(loss_fn(model(X), y).item())
        mus.append(opt.controls[0].mu)
    # the undamped Newton step (θ: 3 -> -6.6) would raise the loss 400-fold
    assert opt.num_rejected >= 1 and max(mus) > mus[0]
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # factor 1
    assert losses[-1] < 1e-3 * losses[0]


def test_without_closure_the_ratio_comes_one_step_late_by_the_secant_rule():
    """On a quadratic the secant ½(g + g')ᵀs is the exact change: ρ = 1."""
    torch.manual_seed(0)
    model = extend(nn.Linear(3, 2).double())
    loss_fn = extend(nn.MSELoss())
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randn(20, 2, dtype=torch.float64)
    opt = DampedNewton(model.parameters(), 0.5, mc_samples=0,
                       initial_damping=1e-3, damping_floor=1e-4)  # fmt: skip
    mus = [opt.controls[0].mu]
    for _ in range(2):
        opt.zero_grad()
        with backpack(*opt.extensions, extension_hook=opt.hook):
            loss_fn(model(X), y).backward()
        opt.step()
        mus.append(opt.controls[0].mu)
    assert mus[1] == mus[0]  # nothing known yet after the first step
    assert mus[2] == pytest.approx(0.5 * mus[0])  # ρ = 1 seen at the second


def test_two_dimensional_nonconvex_loss_never_increases_with_closure():
    torch.manual_seed(3)
    model = extend(nn.Sequential(nn.Linear(2, 1), nn.Tanh()).double())
    with torch.no_grad():
        model[0].weight.mul_(8.0)
    loss_fn = extend(nn.MSELoss())
    X = torch.randn(6, 2, dtype=torch.float64)
    y = torch.rand(6, 1, dtype=torch.float64) * 1.6 - 0.8
    opt = DampedNewton(model.parameters(), BootstrapDamping(generator=0), mc_samples=0)
    losses = closure_losses(opt, model, loss_fn, X, y, steps=25)
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("closure", [False, True])
def test_saturated_net_gets_a_bounded_step(closure):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())
    with torch.no_grad():
        model[0].weight.mul_(40.0)  # every tanh saturated
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    dense = dense_curvature(model, loss_fn, X, y)
    lam_max = torch.linalg.eigvalsh(dense.ggn).max()
    bound = 10.0 * dense.grad.norm() / lam_max  # the first trust radius, at most
    opt = DampedNewton(model.parameters(), 0.0, mc_samples=0)
    before = flat(model.parameters())
    if closure:
        opt.step(make_closure(opt, model, loss_fn, X, y))
    else:
        opt.zero_grad()
        with backpack(*opt.extensions, extension_hook=opt.hook):
            loss_fn(model(X), y).backward()
        opt.step()
    step = flat(model.parameters()) - before
    assert torch.isfinite(step).all()
    assert step.norm() <= bound * (1 + 1e-8)
    undamped = DampedNewton(model.parameters(), 0.0, mc_samples=0, safeguards=False)
    assert undamped.controls[0].radius is None


def _small_net_eigenspace():
    """A small extended net with a batch, and its dense GGN eigenspace and gradient."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double())
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    dense = dense_curvature(model, loss_fn, X, y)
    evals, evecs = torch.linalg.eigh(dense.ggn)
    keep = evals > 1e-10 * evals.max()
    return model, loss_fn, X, y, (evecs[:, keep], evals[keep], dense.grad)


def test_complement_step_matches_dense_projection():
    model, loss_fn, X, y, (E, lam, g) = _small_net_eigenspace()
    newton = -E @ ((E.T @ g) / (lam + 0.5))
    expected = newton - 0.3 * (g - E @ (E.T @ g))
    opt = DampedNewton(model.parameters(), 0.5, mc_samples=0, safeguards=False,
                       complement_lr=0.3)  # fmt: skip
    before = flat(model.parameters())
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss_fn(model(X), y).backward()
    opt.step()
    torch.testing.assert_close(
        flat(model.parameters()) - before, expected, rtol=1e-7, atol=1e-10
    )


def test_step_control_state_round_trip_and_validation():
    control = StepControl(trust_solve="scale")  # the floor alone sets the damping
    gammas, evals = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 1e-6])
    plan = control.plan(gammas, evals, torch.zeros(2), lr=1.0)
    # the flat direction's denominator is clamped to μ λ_max
    assert plan.dampings[1] == pytest.approx(control.mu * 4.0 - 1e-6)
    control.update(-1.0, plan)
    state = control.state_dict()
    other = StepControl()
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match="radius"):
        other.load_state_dict({"mu": 1.0, "radius": -1.0})
    assert other.state_dict() == state


def digits_mlp():
    from experiments.common.training import batch_indices
    from experiments.problems import get_problem, make_extended

    problem = get_problem("digits_mlp")
    data = problem.load_data()
    model, loss_fn = make_extended(problem, data.input_shape, 10, seed=0)

    def batch(step):
        idx = batch_indices(len(data.train_y), 128, step, 0)
        return data.train_x[idx], data.train_y[idx]

    return model, loss_fn, data, batch


@pytest.mark.parametrize("closure", [True, False])
def test_defaults_survive_50_steps_on_digits_mlp(closure):
    model, loss_fn, data, batch = digits_mlp()
    torch.manual_seed(0)
    opt = DampedNewton(model.parameters())
    with torch.no_grad():
        start = loss_fn(model(data.train_x), data.train_y).item()
    for step in range(50):
        X, y = batch(step)
        if closure:
            opt.step(make_closure(opt, model, loss_fn, X, y))
        else:
            opt.zero_grad()
            with backpack(*opt.extensions, extension_hook=opt.hook):
                loss_fn(model(X), y).backward()
            opt.step()
    with torch.no_grad():
        final = loss_fn(model(data.train_x), data.train_y).item()
    assert math.isfinite(final) and final < 0.25 * start
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lanczos_defaults_with_fresh_curvature_batches_on_digits_mlp():
    model, loss_fn, data, batch = digits_mlp()
    calls = []

    def curvature_batch():
        calls.append(1)
        return batch(1000 + len(calls))

    opt = LanczosDampedNewton(model, loss_fn, curvature_batch, k=5, refresh_every=10,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        start = loss_fn(model(data.train_x), data.train_y).item()
    for step in range(20):
        X, y = batch(step)
        opt.step(make_closure(opt, model, loss_fn, X, y))
    with torch.no_grad():
        final = loss_fn(model(data.train_x), data.train_y).item()
    assert len(calls) == 3  # one fresh batch per refresh
    assert math.isfinite(final) and final < start


def test_adaptive_complement_step_is_orthogonal_and_inside_the_trust_region():
    """Default: a gradient step in the flat complement, rate 1/λ_1 at first."""
    model, loss_fn, X, y, (E, lam, g) = _small_net_eigenspace()
    perp = g - E @ (E.T @ g)
    opt = DampedNewton(model.parameters(), 0.5, mc_samples=0, trust_radius=None)
    assert opt.param_groups[0]["complement_lr"] == "auto"
    before = flat(model.parameters())
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss_fn(model(X), y).backward()
    opt.step()
    step = flat(model.parameters()) - before
    newton = -E @ ((E.T @ g) / (lam + 0.5))
    torch.testing.assert_close(step, newton - perp / lam.max(), rtol=1e-7, atol=1e-10)
    plain = DampedNewton(model.parameters(), 0.5, safeguards=False)
    assert plain.param_groups[0]["complement_lr"] == 0.0


class _RecordingStrategy:
    """No damping; counts ``step_rejected()`` calls (the strategy hook)."""

    def __init__(self):
        self.rejected = 0

    def __call__(self, gammas, lambdas):
        return torch.zeros(gammas.shape[1], dtype=gammas.dtype)

    def step_rejected(self):
        self.rejected += 1


@pytest.mark.parametrize("lanczos", [False, True])
def test_undone_step_is_reported_to_the_strategy(lanczos):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())
    loss_fn = extend(nn.MSELoss())
    X, y = (
        torch.randn(8, 3, dtype=torch.float64),
        torch.randn(8, 2, dtype=torch.float64),
    )
    strategy = _RecordingStrategy()
    if lanczos:
        opt = LanczosDampedNewton(model, loss_fn, (X, y), k=2, damping=strategy)
    else:
        opt = DampedNewton(model.parameters(), strategy)
    before = flat(model.parameters())

    def closure():  # anywhere but at the start the loss is higher
        opt.zero_grad()
        moved = not torch.equal(flat(model.parameters()), before)
        loss = loss_fn(model(X), y) + (10.0 if moved else 0.0)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.num_rejected == 1 and strategy.rejected == 1
    assert torch.equal(flat(model.parameters()), before)
    opt.step(make_closure(opt, model, loss_fn, X, y))  # kept: no report
    assert opt.num_rejected == 1 and strategy.rejected == 1
