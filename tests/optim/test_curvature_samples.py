"""``curvature_samples``: exact curvature on the batch's first samples (issue 12)."""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from tests.optim.helpers import make_closure
from tests.reference import dense_curvature
from vivitlib.optim import ConstantDamping, DampedNewton

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DELTA = 0.3


def _problem(seed=0):
    """Tanh MLP, D = 31 parameters, 3 classes."""
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double())
    return model, extend(nn.CrossEntropyLoss())


def _batch(n, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=gen)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _dense_step(model, loss_fn, X, y, curv):
    """``-Σ_k γ_k / (λ_k + δ) e_k``: GGN of the samples ``curv``, full-batch ``g``."""
    grad = dense_curvature(model, loss_fn, X, y).grad
    ggn = dense_curvature(model, loss_fn, X[curv], y[curv]).ggn
    evals, evecs = torch.linalg.eigh(ggn)
    keep = evals > 1e-10 * evals.max()
    evals, evecs = evals[keep], evecs[:, keep]
    return -evecs @ ((evecs.T @ grad) / (evals + DELTA))


@pytest.mark.parametrize(
    ("batches", "curvature", "options"),
    [
        # 3 < 4: all samples of that batch
        ([10, 3, 10], [4, 3, 4], {"curvature_samples": 4}),
        # "auto": half of each batch (of at most 32), at least one sample
        ([10, 10, 4, 1], [5, 5, 2, 1], {}),
        # "auto" with mc_samples given: exact on all samples
        ([6], [6], {"mc_samples": 0}),
    ],
)
@pytest.mark.parametrize("with_closure", [True, False])
def test_step_uses_exact_curvature_of_the_first_samples(
    batches, curvature, options, with_closure
):
    model, loss_fn = _problem()
    opt = DampedNewton(model.parameters(), ConstantDamping(DELTA), safeguards=False,
                       **options)  # fmt: skip
    for seed, (n, first) in enumerate(zip(batches, curvature)):
        X, y = _batch(n, seed)
        expected = _flat(model) + _dense_step(model, loss_fn, X, y, slice(0, first))
        closure = make_closure(opt, model, loss_fn, X, y)
        if with_closure:
            opt.step(closure)
        else:
            with backpack(*opt.extensions, extension_hook=opt.hook):
                closure()
            opt.step()
        torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)


def test_checkpoints_of_earlier_versions_still_load():
    """The batch size is read per pass: no state; an old ``last_batch_size`` is
    ignored."""
    model, loss_fn = _problem()
    opt = DampedNewton(model.parameters(), ConstantDamping(DELTA), safeguards=False)
    opt.step(make_closure(opt, model, loss_fn, *_batch(10, 0)))
    state = opt.state_dict()
    assert "last_batch_size" not in state
    fresh = DampedNewton(model.parameters(), ConstantDamping(DELTA), safeguards=False)
    fresh.load_state_dict({**state, "last_batch_size": [10, 3]})
    X, y = _batch(12, 1)
    expected = _flat(model) + _dense_step(model, loss_fn, X, y, slice(0, 6))
    fresh.step(make_closure(fresh, model, loss_fn, X, y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)


def test_auto_curvature_samples_keep_the_gram_matrix_small_for_many_outputs():
    """40 classes, batch 40: 512 // 40 = 12 samples (not 20)."""
    torch.manual_seed(0)
    model = extend(nn.Linear(3, 40).double())
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = DampedNewton(model.parameters(), ConstantDamping(DELTA), safeguards=False)
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 40, (40,), generator=gen)
        expected = _flat(model) + _dense_step(model, loss_fn, X, y, slice(0, 12))
        opt.step(make_closure(opt, model, loss_fn, X, y))
        torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)


def test_given_mc_samples_and_subsampling_apply_with_and_without_closure():
    model, loss_fn = _problem()
    opt = DampedNewton(model.parameters(), mc_samples=1)
    assert opt.ggn.mc_samples == 1 and opt.ggn.subsampling is None
    default = DampedNewton(model.parameters())
    assert default.ggn.mc_samples == 0
    exact = DampedNewton(model.parameters(), ConstantDamping(DELTA), mc_samples=0,
                         subsampling=[0, 1], safeguards=False)  # fmt: skip
    X, y = _batch(5, 1)
    expected = _flat(model) + _dense_step(model, loss_fn, X, y, slice(0, 2))
    with backpack(*exact.extensions, extension_hook=exact.hook):
        make_closure(exact, model, loss_fn, X, y)()
    exact.step()
    torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"curvature_samples": 0}, ValueError, "curvature_samples must be >= 1"),
        ({"curvature_samples": 2.5}, TypeError, "curvature_samples must be an int"),
        ({"curvature_samples": True}, TypeError, "curvature_samples must be an int"),
        ({"curvature_samples": "all"}, TypeError, "'auto' or None"),
        ({"curvature_samples": 8, "subsampling": [0]}, ValueError,
         "pass curvature_samples=None"),
        ({"curvature_samples": 8, "mc_samples": 1}, ValueError,
         "pass curvature_samples=None"),
    ],
)  # fmt: skip
def test_bad_curvature_samples_raise_before_anything_changes(options, error, match):
    model, _ = _problem()
    before = _flat(model)
    with pytest.raises(error, match=match):
        DampedNewton(model.parameters(), **options)
    assert torch.equal(_flat(model), before)
    assert all(p.grad is None for p in model.parameters())
