"""Tests for DampedNewton against dense float64 references (torch.func)."""

import copy
import io
import math
import warnings

import pytest
import torch
from backpack import backpack, extend
from torch.func import functional_call, hessian, jacrev

from vivitlib.optim import BootstrapDamping, ConstantDamping, DampedNewton

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def linear_problem(n=20, d_in=3, d_out=2, seed=0):
    torch.manual_seed(seed)
    model = extend(torch.nn.Linear(d_in, d_out).double())
    loss_fn = extend(torch.nn.MSELoss())
    X = torch.randn(n, d_in, dtype=torch.float64)
    y = torch.randn(n, d_out, dtype=torch.float64)
    return model, loss_fn, X, y


def backward(opt, model, loss_fn, X, y):
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss = loss_fn(model(X), y)
        loss.backward()
    return loss


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def dense_hessian_grad(model, loss_fn, X, y, params):
    """Dense Hessian and gradient of the loss w.r.t. ``params`` (flattened)."""
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    others = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    sizes = [math.prod(shapes[n]) for n in names]
    plain = torch.nn.Linear(model.in_features, model.out_features).double()

    def loss_of(theta):
        chunks = dict(zip(names, theta.split(sizes)))
        values = {n: c.reshape(shapes[n]) for n, c in chunks.items()} | others
        return torch.nn.functional.mse_loss(functional_call(plain, values, (X,)), y)

    theta = flat(params)
    return hessian(loss_of)(theta), jacrev(loss_of)(theta)


def dense_damped_step(H, g, damping):
    """-Σ_k g·e_k / (λ_k + δ_k) e_k over the nontrivial eigenpairs of H, descending."""
    evals, evecs = torch.linalg.eigh(H)
    evals, evecs = evals.flip(0), evecs.flip(1)
    keep = evals > 1e-10 * evals[0]
    evals, evecs = evals[keep], evecs[:, keep]
    delta = torch.as_tensor(damping, dtype=torch.float64).expand(evals.shape)
    coeff = torch.where(torch.isinf(delta), 0.0, -(evecs.T @ g) / (evals + delta))
    return evecs @ coeff


def test_undamped_full_batch_step_lands_on_minimiser():
    model, loss_fn, X, y = linear_problem()
    opt = DampedNewton(model.parameters(), damping=0.0, mc_samples=0)
    backward(opt, model, loss_fn, X, y)
    opt.step()
    design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [d_in + 1, d_out]
    assert torch.allclose(model.weight, solution[:-1].T, atol=1e-6, rtol=0)
    assert torch.allclose(model.bias, solution[-1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("damping", [0.5, "per_direction"])
def test_damped_step_matches_dense_formula(damping):
    # rank-deficient G with distinct eigenvalues (one output: no degeneracy)
    model, loss_fn, X, y = linear_problem(n=3, d_in=4, d_out=1)
    params = list(model.parameters())
    H, g = dense_hessian_grad(model, loss_fn, X, y, params)
    num_directions = int((torch.linalg.eigvalsh(H) > 1e-10).sum())
    if damping == "per_direction":
        damping = torch.linspace(0.1, 2.0, num_directions, dtype=torch.float64)
        damping[1] = math.inf
    expected = dense_damped_step(H, g, damping)

    strategy = damping if isinstance(damping, float) else (lambda gam, lam: damping)
    opt = DampedNewton(params, damping=strategy, mc_samples=0)
    before = flat(params)
    backward(opt, model, loss_fn, X, y)
    assert opt.ggn.blocks[0].num_directions == num_directions < H.shape[0]
    opt.step()
    assert torch.allclose(flat(params) - before, expected, atol=1e-10, rtol=1e-8)


def test_block_diagonal_groups_match_dense_blocks():
    model, loss_fn, X, y = linear_problem(n=3, d_in=3, d_out=2)
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}]
    expected = []
    for group in groups:
        H, g = dense_hessian_grad(model, loss_fn, X, y, group["params"])
        expected.append(group.get("lr", 1.0) * dense_damped_step(H, g, 0.1))
    opt = DampedNewton(groups, damping=ConstantDamping(0.1), mc_samples=0)
    before = [flat(group["params"]) for group in groups]
    backward(opt, model, loss_fn, X, y)
    opt.step()
    for group, old, step in zip(groups, before, expected):
        assert torch.allclose(flat(group["params"]) - old, step, atol=1e-10)


def test_mlp_cross_entropy_with_subsampling_matches_dense_ggn():
    from tests.reference import dense_curvature

    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    model, loss_fn = extend(model), extend(torch.nn.CrossEntropyLoss())
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    curv_idx, grad_idx = [0, 2, 3], [1, 2, 4, 5]
    params = list(model.parameters())
    dense = dense_curvature(model, loss_fn, X, y, params)
    G = dense.per_sample_ggn[curv_idx].mean(0)
    g = dense.per_sample_grads[grad_idx].mean(0)
    expected = 0.7 * dense_damped_step(G, g, 0.3)

    opt = DampedNewton(
        params, 0.3, lr=0.7, mc_samples=0, subsampling=curv_idx,
        grad_subsampling=grad_idx, safeguards=False,
    )  # fmt: skip
    before = flat(params)
    backward(opt, model, loss_fn, X, y)
    opt.step()
    assert torch.allclose(flat(params) - before, expected, atol=1e-9, rtol=1e-7)


def run_steps(model, opt, batches, loss_fn):
    for X, y in batches:
        backward(opt, model, loss_fn, X, y)
        opt.step()


def test_state_dict_round_trip_reproduces_next_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)
    )
    model, loss_fn = extend(net.double()), extend(torch.nn.CrossEntropyLoss())
    batches = [
        (torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,)))
        for _ in range(3)
    ]
    opt = DampedNewton(
        model.parameters(), BootstrapDamping(generator=0), lr=0.5, mc_samples=0,
        weight_decay=0.01, track_dampings=True,
    )  # fmt: skip
    run_steps(model, opt, batches[:2], loss_fn)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    model_copy = extend(copy.deepcopy(net))
    run_steps(model, opt, batches[2:], loss_fn)
    assert any(torch.isfinite(r.dampings).any() for r in opt.damping_history[-1:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_copy.load_state_dict(saved["model"])
    opt_copy = DampedNewton(
        model_copy.parameters(), BootstrapDamping(generator=123), lr=1.0, mc_samples=0
    )
    opt_copy.load_state_dict(saved["opt"])
    assert opt_copy.param_groups[0]["lr"] == 0.5
    assert opt_copy.param_groups[0]["weight_decay"] == 0.01
    run_steps(model_copy, opt_copy, batches[2:], loss_fn)
    assert torch.equal(flat(model.parameters()), flat(model_copy.parameters()))


def test_step_without_backward_pass_raises():
    model, loss_fn, X, y = linear_problem()
    opt = DampedNewton(model.parameters(), mc_samples=0)
    with pytest.raises(RuntimeError, match="extension_hook=opt.hook"):
        opt.step()
    backward(opt, model, loss_fn, X, y)
    opt.step()
    with pytest.raises(RuntimeError, match="no curvature"):
        opt.step()  # results are used once
    opt.zero_grad()
    loss_fn(model(X), y).backward()  # outside backpack
    with pytest.raises(RuntimeError, match="backpack"):
        opt.step()


def test_closure_runs_inside_backpack():
    model, loss_fn, X, y = linear_problem()
    opt = DampedNewton(model.parameters(), 0.0, mc_samples=0)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = loss_fn(model(X), y)
    assert second < first


def test_no_signal_leaves_parameters_unchanged():
    model, loss_fn, X, y = linear_problem()
    opt = DampedNewton(
        model.parameters(), lambda g, lam: torch.full((g.shape[1],), math.inf),
        mc_samples=0, weight_decay=0.1, track_dampings=True,
    )  # fmt: skip
    before = flat(model.parameters())
    backward(opt, model, loss_fn, X, y)
    with pytest.warns(UserWarning, match="rejected every direction"):
        opt.step()
    assert torch.equal(flat(model.parameters()), before)
    assert not opt.damping_history[0].applied


def test_no_positive_curvature_leaves_parameters_unchanged():
    torch.manual_seed(0)
    first = torch.nn.Linear(3, 4).double()
    torch.nn.init.constant_(first.bias, -100.0)  # every ReLU is dead
    model = extend(torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    model = model.double()
    loss_fn = extend(torch.nn.MSELoss())
    X, y = (
        torch.randn(8, 3, dtype=torch.float64),
        torch.randn(8, 2, dtype=torch.float64),
    )
    opt = DampedNewton(first.parameters(), mc_samples=0, track_dampings=True)
    before = flat(first.parameters())
    backward(opt, model, loss_fn, X, y)
    with pytest.warns(UserWarning, match="no direction with positive curvature"):
        opt.step()
    assert torch.equal(flat(first.parameters()), before)
    (record,) = opt.damping_history
    assert record.dampings.numel() == 0 and not record.applied


def test_weight_decay_is_decoupled():
    model, loss_fn, X, y = linear_problem()
    opt = DampedNewton(model.parameters(), 1e30, lr=0.5, weight_decay=0.2, mc_samples=0)
    before = flat(model.parameters())
    backward(opt, model, loss_fn, X, y)
    opt.step()
    assert torch.allclose(flat(model.parameters()), 0.9 * before, atol=1e-12)


def test_mc_default_and_damping_history():
    model, loss_fn, X, y = linear_problem(n=8)
    opt = DampedNewton(model.parameters(), track_dampings=True)
    backward(opt, model, loss_fn, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        opt.step()
    (record,) = opt.damping_history
    assert record.step == 0 and record.group == 0
    assert record.dampings.shape == record.evals.shape == record.gamma_means.shape
    assert opt.state[model.weight]["step"] == 1


def test_add_param_group_rebuilds_curvature():
    model, loss_fn, X, y = linear_problem()
    opt = DampedNewton([model.weight], 0.1, mc_samples=0)
    opt.add_param_group({"params": [model.bias], "damping": 1.0, "lr": 0.5})
    assert isinstance(opt.damping_strategies[1], ConstantDamping)
    assert "damping" not in opt.param_groups[1]
    backward(opt, model, loss_fn, X, y)
    assert len(opt.ggn.blocks) == 2
    opt.step()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"lr": 0.0}, ValueError),
        ({"lr": -1.0}, ValueError),
        ({"lr": "1"}, TypeError),
        ({"weight_decay": -0.1}, ValueError),
        ({"damping": "bootstrap"}, TypeError),
        ({"damping": -1.0}, ValueError),
        ({"mc_samples": -1}, ValueError),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, error):
    model, *_ = linear_problem()
    with pytest.raises(error):
        DampedNewton(model.parameters(), **kwargs)


@pytest.mark.parametrize(
    "output, error",
    [
        (lambda k: torch.ones(k + 1), ValueError),
        (lambda k: torch.full((k,), float("nan")), ValueError),
        (lambda k: -torch.ones(k), ValueError),
        (lambda k: [1.0] * k, TypeError),
    ],
)
def test_bad_strategy_output_raises_before_touching_parameters(output, error):
    model, loss_fn, X, y = linear_problem()
    opt = DampedNewton(
        model.parameters(), lambda g, lam: output(g.shape[1]), mc_samples=0
    )
    before = flat(model.parameters())
    backward(opt, model, loss_fn, X, y)
    with pytest.raises(error, match="damping strategy"):
        opt.step()
    assert torch.equal(flat(model.parameters()), before)


def test_load_state_dict_rejects_other_strategy_type():
    model, *_ = linear_problem()
    state = DampedNewton(model.parameters(), 0.1, mc_samples=0).state_dict()
    other = DampedNewton(
        model.parameters(), BootstrapDamping(generator=0), mc_samples=0
    )
    with pytest.raises(ValueError, match="ConstantDamping"):
        other.load_state_dict(state)
