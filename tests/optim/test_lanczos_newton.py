"""LanczosDampedNewton against dense damped Newton and the Gram-space optimiser."""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from tests.optim.helpers import closure_losses
from tests.reference import dense_curvature, per_sample_hessians
from vivitlib.optim import ConstantDamping, DampedNewton, LanczosDampedNewton


def _quadratic_problem(seed=0):
    """Linear regression: GGN = Hessian, full rank (D = 10 < N·C)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    model = extend(nn.Linear(4, 2).double())
    return model, extend(nn.MSELoss()), X, y


def _run(opt, model, loss_fn, X, y):
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        loss_fn(model(X), y).backward()
    opt.step()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_step_equals_gram_step_and_dense_newton(damping):
    model, loss_fn, X, y = _quadratic_problem()
    start = _flat(model)
    dense = dense_curvature(model, loss_fn, X, y)
    expected = start - torch.linalg.solve(
        dense.ggn + damping * torch.eye(len(start), dtype=torch.float64), dense.grad
    )
    lanczos = LanczosDampedNewton(model, loss_fn, (X, y), k=10, tol=1e-12,
                                  damping=ConstantDamping(damping))  # fmt: skip
    _run(lanczos, model, loss_fn, X, y)
    torch.testing.assert_close(_flat(model), expected, rtol=1e-6, atol=1e-8)
    # Gram-space optimiser from the same start gives the same step
    with torch.no_grad():
        for p, v in zip(model.parameters(), start.split([8, 2])):
            p.copy_(v.reshape(p.shape))
    gram = DampedNewton(
        model.parameters(), damping=ConstantDamping(damping), mc_samples=0
    )
    _run(gram, model, loss_fn, X, y)
    torch.testing.assert_close(_flat(model), expected, rtol=1e-6, atol=1e-8)


def test_refresh_schedule_and_product_count():
    model, loss_fn, X, y = _quadratic_problem()
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=3, refresh_every=2, lr=0.1,
                              damping=1.0)  # fmt: skip
    for _ in range(5):
        _run(opt, model, loss_fn, X, y)
    assert [r.step for r in opt.refresh_history] == [0, 2, 4]
    assert all(r.num_products > 0 for r in opt.refresh_history)
    assert all(r.evals.shape == (3,) for r in opt.refresh_history)


def test_refresh_directions_are_top_eigenvectors_of_hessian():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double())
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=2, curvature="hessian",
                              tol=1e-10, damping=1.0)  # fmt: skip
    H = per_sample_hessians(model, loss_fn, X, y).mean(0)
    evals = torch.linalg.eigvalsh(H)
    top = evals[evals.abs().argsort(descending=True)][:2]
    torch.testing.assert_close(opt.evals, top.abs(), rtol=1e-6, atol=1e-9)
    D = torch.cat([d.flatten(1) for d in opt.evecs], 1)
    torch.testing.assert_close(D @ H @ D.T, torch.diag(opt.refresh_history[0].evals.double()),
                               rtol=1e-6, atol=1e-8)  # fmt: skip


def test_state_dict_round_trip_keeps_directions():
    model, loss_fn, X, y = _quadratic_problem()
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=3, refresh_every=100, lr=0.5)
    _run(opt, model, loss_fn, X, y)
    state = opt.state_dict()
    snapshot = [p.detach().clone() for p in model.parameters()]
    _run(opt, model, loss_fn, X, y)
    after = _flat(model)
    with torch.no_grad():
        for p, v in zip(model.parameters(), snapshot):
            p.copy_(v)
    fresh = LanczosDampedNewton(model, loss_fn, (X, y), k=3, refresh_every=100, lr=0.5,
                                generator=torch.Generator().manual_seed(7))  # fmt: skip
    fresh.load_state_dict(state)
    for d, e in zip(fresh.evecs, state["evecs"]):
        assert torch.equal(d, e)
    _run(fresh, model, loss_fn, X, y)
    torch.testing.assert_close(_flat(model), after, rtol=0, atol=0)


def test_errors():
    model, loss_fn, X, y = _quadratic_problem()
    with pytest.raises(ValueError, match="curvature must be"):
        LanczosDampedNewton(model, loss_fn, (X, y), curvature="fisher")
    with pytest.raises(ValueError, match="refresh_every"):
        LanczosDampedNewton(model, loss_fn, (X, y), refresh_every=0)
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=2)
    with pytest.raises(RuntimeError, match="no directional derivatives"):
        opt.step()


def test_complement_step_matches_dense_heavy_ball():
    """``-Σ_k γ_k/(λ_k+δ) d_k - η m``, ``m ← β m + (g - D Dᵀ g)`` (dense, float64)."""
    model, loss_fn, X, y = _quadratic_problem()
    eta, beta, delta = 0.2, 0.5, 0.3
    opt = LanczosDampedNewton(model, loss_fn, (X, y), k=3, tol=1e-12,
                              refresh_every=100, damping=ConstantDamping(delta),
                              safeguards=False, complement_lr=eta,
                              complement_momentum=beta)  # fmt: skip
    dirs = torch.cat([d.flatten(1) for d in opt.evecs], dim=1).T  # [D, 3]
    buffer = None
    for _ in range(2):
        dense = dense_curvature(model, loss_fn, X, y)
        gammas = dirs.T @ dense.grad
        curvs = torch.einsum("dk,de,ek->k", dirs, dense.ggn, dirs)
        perp = dense.grad - dirs @ gammas
        buffer = perp if buffer is None else perp + beta * buffer
        expected = _flat(model) - dirs @ (gammas / (curvs + delta)) - eta * buffer
        _run(opt, model, loss_fn, X, y)
        torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)
    assert all("complement_buffer" in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"complement_lr": -1.0}, ValueError, "complement_lr must be finite"),
        ({"complement_lr": "fast"}, TypeError, "complement_lr must be a float"),
        ({"complement_lr": "auto", "safeguards": False}, ValueError,
         "pass a number or safeguards=True"),
        ({"complement_lr": 0.1, "complement_momentum": 1.0}, ValueError,
         "complement_momentum must lie in"),
    ],
)  # fmt: skip
def test_bad_complement_options_raise_before_anything_changes(options, error, match):
    model, loss_fn, X, y = _quadratic_problem()
    before = _flat(model)
    with pytest.raises(error, match=match):
        LanczosDampedNewton(model, loss_fn, (X, y), k=2, **options)
    assert torch.equal(_flat(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_auto_complement_keeps_the_closure_loss_from_rising():
    """With a closure the batch loss never rises; the complement lowers it more."""
    final = []
    for rate in ("auto", 0.0):
        model, loss_fn, X, y = _quadratic_problem()
        opt = LanczosDampedNewton(model, loss_fn, (X, y), k=2, damping=0.0,
                                  complement_lr=rate)  # fmt: skip
        losses = closure_losses(opt, model, loss_fn, X, y, steps=10)
        assert all(b <= a for a, b in zip(losses, losses[1:]))
        final.append(losses[-1])
    assert final[0] < 0.9 * final[1]
