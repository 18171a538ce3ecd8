"""Bad inputs and faults of the Newton optimisers: right answer or a clear error.

Every failure must leave parameters, ``.grad`` and the optimiser state untouched.
"""

import copy
import math

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from tests.reference import dense_curvature
from vivitlib.optim import (
    BootstrapDamping,
    ConstantDamping,
    DampedNewton,
    LanczosDampedNewton,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def mlp(seed=0, reduction="mean"):
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, loss_fn, X, y


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def backward(opt, model, loss_fn, X, y):
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss = loss_fn(model(X), y)
        loss.backward()
    return loss


def dense_step(G, g, damping, lr=1.0):
    """-lr Σ_k γ_k / (λ_k + δ) e_k over the nontrivial eigenpairs of G."""
    evals, evecs = torch.linalg.eigh(G)
    keep = evals > 1e-10 * evals.max()
    evals, evecs = evals[keep], evecs[:, keep]
    return -lr * evecs @ ((evecs.T @ g) / (evals + damping))


def snapshot(model, opt):
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return flat(model.parameters()), grads, copy.deepcopy(opt.state_dict())


def assert_untouched(model, opt, before):
    params, grads, state = before
    assert torch.equal(flat(model.parameters()), params)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    now = opt.state_dict()
    assert now.keys() == state.keys()
    assert now["param_groups"] == state["param_groups"]
    assert now.get("num_steps") == state.get("num_steps")
    assert now.get("control_states") == state.get("control_states")
    assert now["state"].keys() == state["state"].keys()


# ---- frozen parameters --------------------------------------------------------


@pytest.mark.parametrize("safeguards", [False, True])
def test_frozen_parameter_in_group_gets_no_step_and_others_their_own(safeguards):
    model, loss_fn, X, y = mlp()
    model[0].bias.requires_grad_(False)  # frozen, in the middle of the group
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    dense = dense_curvature(model, loss_fn, X, y, trainable)
    expected = dense_step(dense.ggn, dense.grad, 0.3, lr=0.5)
    opt = DampedNewton(params, 0.3, lr=0.5, mc_samples=0, safeguards=safeguards,
                       trust_radius=None, damping_floor=0.0, initial_damping=0.0)  # fmt: skip
    frozen_before = model[0].bias.detach().clone()
    before = flat(trainable)
    backward(opt, model, loss_fn, X, y)
    opt.step()
    assert torch.equal(model[0].bias, frozen_before)
    torch.testing.assert_close(
        flat(trainable) - before, expected, rtol=1e-7, atol=1e-10
    )


def test_frozen_parameter_in_added_group():
    model, loss_fn, X, y = mlp()
    model[2].weight.requires_grad_(False)
    opt = DampedNewton(list(model[0].parameters()), 0.3, mc_samples=0)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.5})
    frozen = model[2].weight.detach().clone()
    backward(opt, model, loss_fn, X, y)
    opt.step()
    assert torch.equal(model[2].weight, frozen)


# ---- 'sum' and 'mean' ---------------------------------------------------------


def test_sum_and_mean_reductions_give_the_same_step():
    """Newton steps are scale invariant when the damping scales with the loss."""
    steps = {}
    for reduction, delta in (("mean", 0.2), ("sum", 0.2 * 10)):
        model, loss_fn, X, y = mlp(reduction=reduction)
        opt = DampedNewton(model.parameters(), delta, mc_samples=0)
        before = flat(model.parameters())
        backward(opt, model, loss_fn, X, y)
        opt.step()
        steps[reduction] = flat(model.parameters()) - before
    torch.testing.assert_close(steps["sum"], steps["mean"], rtol=1e-7, atol=1e-10)
    model, loss_fn, X, y = mlp(reduction="sum")
    dense = dense_curvature(model, loss_fn, X, y)
    expected = dense_step(dense.ggn, dense.grad, 2.0)
    opt = DampedNewton(model.parameters(), 2.0, mc_samples=0, safeguards=False)
    before = flat(model.parameters())
    backward(opt, model, loss_fn, X, y)
    opt.step()
    torch.testing.assert_close(
        flat(model.parameters()) - before, expected, rtol=1e-7, atol=1e-10
    )


def test_strategy_sees_batch_scaled_derivatives():
    seen = {}
    for reduction in ("mean", "sum"):
        model, loss_fn, X, y = mlp(reduction=reduction)

        def strategy(gammas, lambdas, reduction=reduction):
            seen[reduction] = (gammas.mean(0), lambdas.mean(0))
            return torch.zeros(gammas.shape[1], dtype=gammas.dtype)

        opt = DampedNewton(model.parameters(), strategy, mc_samples=0)
        backward(opt, model, loss_fn, X, y)
        evals = opt.ggn.blocks[0].evals.clone()
        opt.step()
        torch.testing.assert_close(seen[reduction][1], evals)
    for mean, total in zip(seen["mean"], seen["sum"]):
        torch.testing.assert_close(total, 10 * mean)


# ---- strategy states ----------------------------------------------------------


@pytest.mark.parametrize(
    "change, error",
    [
        ({"percentile": 250.0}, ValueError),
        ({"candidates": torch.tensor([-1.0, math.nan])}, ValueError),
        ({"candidates": torch.tensor([])}, ValueError),
        ({"num_resamples": 0}, ValueError),
        ({"generator_state": [1, 2]}, TypeError),
    ],
)
def test_bootstrap_load_state_dict_validates(change, error):
    strategy = BootstrapDamping(generator=0)
    state = strategy.state_dict()
    before = copy.deepcopy(state)
    with pytest.raises(error, match=next(iter(change)).split("_")[0]):
        strategy.load_state_dict({**state, **change})
    after = strategy.state_dict()
    assert torch.equal(after["candidates"], before["candidates"])
    assert torch.equal(after["generator_state"], before["generator_state"])
    assert after["percentile"] == before["percentile"]


@pytest.mark.parametrize("delta", [-5.0, math.nan, math.inf, "1"])
def test_constant_damping_validates_on_construction_and_load(delta):
    error = TypeError if isinstance(delta, str) else ValueError
    with pytest.raises(error, match="delta"):
        ConstantDamping(delta)
    strategy = ConstantDamping(0.5)
    with pytest.raises(error, match="delta"):
        strategy.load_state_dict({"delta": delta})
    assert strategy.delta == 0.5


def test_optimizer_load_state_dict_validates_before_changing_anything():
    model, loss_fn, X, y = mlp()
    opt = DampedNewton(model.parameters(), BootstrapDamping(generator=0), mc_samples=0)
    backward(opt, model, loss_fn, X, y)
    opt.step()  # no closure: leaves a 'last_step' per parameter
    good = opt.state_dict()
    before = snapshot(model, opt)

    bad_groups = copy.deepcopy(good)
    bad_groups["param_groups"].append(copy.deepcopy(bad_groups["param_groups"][0]))
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(bad_groups)
    bad_shape = copy.deepcopy(good)
    bad_shape["state"][0]["last_step"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad_shape)
    bad_strategy = copy.deepcopy(good)
    bad_strategy["damping_states"][0]["state"]["percentile"] = 250.0
    with pytest.raises(ValueError, match="percentile"):
        opt.load_state_dict(bad_strategy)
    bad_lr = copy.deepcopy(good)
    bad_lr["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad_lr)
    bad_control = copy.deepcopy(good)
    bad_control["control_states"][0]["mu"] = math.nan
    with pytest.raises(ValueError, match="mu"):
        opt.load_state_dict(bad_control)
    assert_untouched(model, opt, before)
    opt.load_state_dict(good)  # the good state still loads


# ---- faults during a step -----------------------------------------------------


def test_nan_loss_raises_and_leaves_everything_untouched():
    model, loss_fn, X, y = mlp()
    opt = DampedNewton(model.parameters(), mc_samples=0)
    backward(opt, model, loss_fn, X, y)
    opt.step()
    before = snapshot(model, opt)
    X_bad = X.clone()
    X_bad[0, 0] = math.nan

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X_bad), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="NaN"):
        opt.step(closure)
    params, _, state = before
    assert torch.equal(flat(model.parameters()), params)
    assert opt.state_dict()["control_states"] == state["control_states"]
    backward(opt, model, loss_fn, X, y)  # the optimiser still works
    opt.step()


def test_closure_that_raises_leaves_everything_untouched():
    model, loss_fn, X, y = mlp()
    opt = DampedNewton(model.parameters(), mc_samples=0)
    backward(opt, model, loss_fn, X, y)
    before = snapshot(model, opt)

    def closure():
        loss_fn(model(X), y).backward()
        raise KeyError("user error")

    with pytest.raises(KeyError, match="user error"):
        opt.step(closure)
    assert torch.equal(flat(model.parameters()), before[0])
    assert opt.state_dict()["num_steps"] == 0


def test_second_closure_call_that_raises_restores_parameters():
    model, loss_fn, X, y = mlp()
    opt = DampedNewton(model.parameters(), mc_samples=0)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second call fails")
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    params = flat(model.parameters())
    with pytest.raises(RuntimeError, match="second call"):
        opt.step(closure)
    assert torch.equal(flat(model.parameters()), params)
    state = opt.state_dict()
    assert state["num_steps"] == 0 and state["state"] == {}
    assert state["control_states"] == [{"mu": 0.1, "radius": None, "complement": None}]


def test_bad_strategy_leaves_safeguard_state_untouched():
    model, loss_fn, X, y = mlp()
    opt = DampedNewton(model.parameters(), 0.1, mc_samples=0)
    backward(opt, model, loss_fn, X, y)
    opt.step()
    before = snapshot(model, opt)
    opt.damping_strategies[0] = lambda g, lam: -torch.ones(g.shape[1])
    backward(opt, model, loss_fn, X, y)
    before = (before[0], [p.grad.clone() for p in model.parameters()], before[2])
    with pytest.raises(ValueError, match="negative"):
        opt.step()
    assert_untouched(model, opt, before)


def test_unused_parameter_raises_clear_error():
    model, loss_fn, X, y = mlp()
    unused = nn.Linear(2, 2).double()
    opt = DampedNewton([*model.parameters(), *unused.parameters()], mc_samples=0)
    params = flat(model.parameters())
    with pytest.raises(Exception, match="received no GGN factor"):
        backward(opt, model, loss_fn, X, y)
        opt.step()
    assert torch.equal(flat(model.parameters()), params)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"lr": math.nan}, ValueError),
        ({"lr": math.inf}, ValueError),
        ({"weight_decay": math.nan}, ValueError),
        ({"complement_lr": -1.0}, ValueError),
        ({"damping_floor": -1.0}, ValueError),
        ({"initial_damping": math.nan}, ValueError),
        ({"trust_radius": 0.0}, ValueError),
        ({"safeguards": 1}, TypeError),
    ],
)
def test_rejects_bad_options(kwargs, error):
    model, *_ = mlp()
    with pytest.raises(error):
        DampedNewton(model.parameters(), **kwargs)


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty"):
        DampedNewton([])


def test_add_param_group_with_bad_lr_leaves_optimizer_unchanged():
    model, *_ = mlp()
    opt = DampedNewton(list(model[0].parameters()), mc_samples=0)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1 and len(opt.controls) == 1


# ---- LanczosDampedNewton ------------------------------------------------------


def test_lanczos_failed_load_leaves_state_unchanged():
    model, loss_fn, X, y = mlp()
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=3, refresh_every=100)
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss_fn(model(X), y).backward()
    opt.step()
    state = opt.state_dict()
    directions = [d.clone() for d in opt.evecs]
    for bad, match in (
        ({"evecs": [d[:2] for d in state["evecs"]]}, "shape"),
        ({"num_steps": -1}, "num_steps"),
        ({"evals": torch.tensor([math.nan, 1.0, 1.0])}, "finite"),
        ({"param_groups": state["param_groups"] * 2}, "one parameter group"),
    ):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict({**state, **bad})
        assert opt.state_dict()["num_steps"] == 1
        assert all(torch.equal(a, b) for a, b in zip(opt.evecs, directions))


@pytest.mark.parametrize("second_call_only", [False, True])
def test_closure_without_return_value_raises_clearly(second_call_only):
    model, loss_fn, X, y = mlp()
    opt = DampedNewton(model.parameters(), mc_samples=0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        if second_call_only and len(calls) == 1:
            return loss
        return None  # forgot to return the loss

    params = flat(model.parameters())
    with pytest.raises(TypeError, match="return the scalar loss"):
        opt.step(closure)
    assert torch.equal(flat(model.parameters()), params)
    state = opt.state_dict()
    assert state["num_steps"] == 0 and state["state"] == {}
    assert state["control_states"] == [{"mu": 0.1, "radius": None, "complement": None}]
