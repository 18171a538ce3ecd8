"""Structure of the optimisers: numeric groups, one Newton coefficient, lazy refresh."""

import copy
import math
import warnings

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from tests.reference import dense_curvature
from vivitlib.linalg.newton import newton_step_sizes
from vivitlib.optim import (
    BootstrapDamping,
    ConstantDamping,
    DampedNewton,
    LanczosDampedNewton,
)


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double())
    return model, extend(nn.CrossEntropyLoss()), X, y


def _backward(opt, model, loss_fn, X, y):
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss_fn(model(X), y).backward()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_newton_step_sizes_against_elementwise_reference():
    gen = torch.Generator().manual_seed(0)
    gammas = torch.randn(6, generator=gen, dtype=torch.float64)
    curvatures = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0, 0.5], dtype=torch.float64)
    dampings = torch.tensor([0.0, math.inf, 0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    expected = torch.tensor(
        [
            -g / (lam + d) if math.isfinite(d) and lam + d > 0 else 0.0
            for g, lam, d in zip(
                gammas.tolist(), curvatures.tolist(), dampings.tolist()
            )
        ],
        dtype=torch.float64,
    )
    got = newton_step_sizes(gammas, curvatures, dampings)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a candidate table [C, K] broadcasts like the bootstrap's
    table = newton_step_sizes(gammas, curvatures, dampings.new_tensor([[0.5], [2.0]]))
    assert table.shape == (2, 6)
    torch.testing.assert_close(table[1, 0], -gammas[0] / 4.0)


def test_constant_step_equals_dense_solve_through_shared_coefficient():
    model, loss_fn, X, y = _problem()
    dense = dense_curvature(model, loss_fn, X, y)
    evals, evecs = torch.linalg.eigh(dense.ggn)
    keep = evals > 1e-10 * evals.max()
    evals, evecs = evals[keep], evecs[:, keep]
    gammas = evecs.T @ dense.grad
    expected = _flat(model) + evecs @ newton_step_sizes(
        gammas, evals, torch.full_like(evals, 0.3)
    )
    opt = DampedNewton(model.parameters(), 0.3, mc_samples=0, safeguards=False)
    _backward(opt, model, loss_fn, X, y)
    opt.step()
    torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore:DampedNewton. the damping strategy rejected")
def test_param_groups_hold_no_strategy_objects():
    model, loss_fn, X, y = _problem()
    bootstrap = BootstrapDamping(generator=0)
    opt = DampedNewton(
        [{"params": [model[0].weight], "damping": 0.5}, {"params": [model[0].bias]}],
        bootstrap,
        mc_samples=0,
    )
    opt.add_param_group({"params": list(model[2].parameters()), "damping": 2.0})
    for group in opt.param_groups:
        assert "damping" not in group
        assert all(
            isinstance(v, int | float | str | bool | list | type(None))
            for v in group.values()
        )
    first, second, third = opt.damping_strategies
    assert isinstance(first, ConstantDamping) and first.delta == 0.5
    assert second is bootstrap
    assert isinstance(third, ConstantDamping) and third.delta == 2.0
    assert "damping" not in opt.defaults
    # a checkpoint loads into a fresh optimiser and reproduces the next step
    _backward(opt, model, loss_fn, X, y)
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # torch's state_dict holds live entries
    params = [p.detach().clone() for p in model.parameters()]
    _backward(opt, model, loss_fn, X, y)
    opt.step()
    after = _flat(model)
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    fresh = DampedNewton(
        [{"params": [model[0].weight], "damping": 0.5}, {"params": [model[0].bias]}],
        BootstrapDamping(generator=5),
        mc_samples=0,
    )
    fresh.add_param_group({"params": list(model[2].parameters()), "damping": 2.0})
    fresh.load_state_dict(state)
    _backward(fresh, model, loss_fn, X, y)
    fresh.step()
    torch.testing.assert_close(_flat(model), after, rtol=0, atol=0)


def test_strategy_replaced_through_damping_strategies_and_deprecated_group_key():
    model, loss_fn, X, y = _problem()
    reference = DampedNewton(model.parameters(), 0.7, safeguards=False, mc_samples=0)
    start = [p.detach().clone() for p in model.parameters()]
    _backward(reference, model, loss_fn, X, y)
    reference.step()
    expected = _flat(model)
    for how in ("list", "group"):
        with torch.no_grad():
            for p, v in zip(model.parameters(), start):
                p.copy_(v)
        opt = DampedNewton(model.parameters(), 0.1, safeguards=False, mc_samples=0)
        _backward(opt, model, loss_fn, X, y)
        if how == "list":
            opt.damping_strategies[0] = 0.7
            opt.step()
        else:
            opt.param_groups[0]["damping"] = ConstantDamping(0.7)
            with pytest.warns(DeprecationWarning, match="damping_strategies"):
                opt.step()
            assert "damping" not in opt.param_groups[0]
        assert isinstance(opt.damping_strategies[0], ConstantDamping)
        torch.testing.assert_close(_flat(model), expected, rtol=0, atol=0)


def test_lanczos_constructor_has_no_side_effects_and_refreshes_lazily():
    model, loss_fn, X, y = _problem()
    model.train()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    params = _flat(model)
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=2, damping=1.0)
    assert model.training and modes == [] and opt.refresh_history == []
    assert torch.equal(_flat(model), params)
    state = opt.state_dict()  # taking the state runs no refresh either
    assert state["evecs"] is None and state["evals"] is None and modes == []
    extensions = opt.extensions  # the first access refreshes, in eval mode
    assert extensions and len(opt.refresh_history) == 1
    assert modes and not any(modes) and model.training
    assert torch.equal(_flat(model), params)
    # a state without directions loads and refreshes lazily again
    fresh = LanczosDampedNewton(model, loss_fn, (X, y), k=2, damping=1.0)
    fresh.load_state_dict(state)
    assert fresh.refresh_history == []
    torch.testing.assert_close(fresh.evals, opt.evals, rtol=1e-6, atol=1e-9)


def test_lanczos_explicit_refresh_and_validation_in_constructor():
    model, loss_fn, X, y = _problem()
    with pytest.raises(ValueError):
        LanczosDampedNewton(model, loss_fn, (X, y), mc_samples=-1)
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=2)
    record = opt.refresh()
    assert opt.refresh_history == [record]
    _backward(opt, model, loss_fn, X, y)
    opt.step()
    assert len(opt.refresh_history) == 1  # no second refresh before the step


def test_lanczos_deprecated_names_warn_and_agree():
    model, loss_fn, X, y = _problem()
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=2, damping=1.0)
    with pytest.warns(DeprecationWarning, match="evals"):
        eigenvalues = opt.eigenvalues
    with pytest.warns(DeprecationWarning, match="evecs"):
        directions = opt.directions
    with pytest.warns(DeprecationWarning, match="RefreshRecord.evals"):
        record_values = opt.refresh_history[0].eigenvalues
    assert eigenvalues is opt.evals and directions is opt.evecs
    assert record_values is opt.refresh_history[0].evals
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        opt.evals, opt.evecs, opt.refresh_history[0].evals  # noqa: B018
    # checkpoints with the former keys still load
    state = opt.state_dict()
    state["directions"], state["eigenvalues"] = state.pop("evecs"), state.pop("evals")
    fresh = LanczosDampedNewton(model, loss_fn, (X, y), k=2, damping=1.0)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.evecs, opt.evecs))
    assert fresh.refresh_history == []
