"""``max_memory=``: same numbers under every budget, clear errors (issue 13)."""

import warnings

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import vivitlib
from tests.core.cases import CASES, make_problem
from tests.core.helpers import assert_block_matches_dense, layerwise_results
from vivitlib.extensions import GGNFactorExtension, conv_backprop
from vivitlib.extensions.lazy import LazyColumns
from vivitlib.memory import MemoryBudget, MemoryBudgetWarning, parse_memory


class _ResidualConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.conv(x))


def _pool_net():
    """conv → ReLU → max pool → conv → dropout(eval) → pool → flatten → linear."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(4, 3, 2), nn.Sigmoid(), nn.Dropout(0.3), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3),
    ).eval()  # fmt: skip


def _batchnorm_conv():
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2), nn.ELU(), nn.Flatten(), nn.Linear(2, 3),
    )  # fmt: skip
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _residual_conv():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), _ResidualConv(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 3),
    )  # fmt: skip


def _targets(n):
    return torch.randint(0, 3, (n,))


NETS = {
    "pool-net": dict(model=_pool_net, loss=nn.CrossEntropyLoss, x=(4, 2, 11, 11),
                     y=_targets),
    "batchnorm-conv": dict(model=_batchnorm_conv, loss=nn.CrossEntropyLoss,
                           x=(4, 2, 7, 7), y=_targets),
    "residual-conv": dict(model=_residual_conv, loss=nn.CrossEntropyLoss,
                          x=(3, 2, 6, 6), y=_targets, converter=True),
}  # fmt: skip
#: 1 byte: every factor lazy, one column per chunk, one-entry kernel chunks;
#: 3000 bytes: some factors lazy, a few columns per chunk.
BUDGETS = (1, 3000)


def _quiet_run(problem, ggn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        problem.run(ggn)
        return ggn.blocks


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", NETS)
def test_budgeted_pass_matches_dense(name, budget):
    problem = make_problem(NETS[name])
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=budget)
    (block,) = _quiet_run(problem, ggn)
    assert_block_matches_dense(block, problem.dense())


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c["id"] in ("cnn-ce", "conv3d-avgpool-ce-sum",
                                     "grouped-dilated-conv-ce", "conv1d-mse",
                                     "adaptive-pool-cnn-ce")],
    ids=lambda c: c["id"],
)  # fmt: skip
def test_budgeted_cases_match_dense(case):
    problem = make_problem(case)
    (block,) = _quiet_run(problem, vivitlib.LowRankGGN(problem.params, max_memory=1))
    assert_block_matches_dense(block, problem.dense())


def _results(name, **kwargs):
    return layerwise_results(make_problem(NETS[name]), **kwargs)


@pytest.mark.parametrize("budget", BUDGETS)
def test_monte_carlo_and_subsampling_unchanged_by_budget(budget):
    options = dict(mc_samples=2, subsampling=[3, 0, 2], grad_subsampling=[1, 2])
    reference = _results("pool-net", **options)
    budgeted = _results("pool-net", max_memory=budget, **options)
    for ref, got in zip(reference, budgeted):
        for a, b in zip(ref, got):
            # eigenvectors up to sign
            if a.dim() == 2 and a.shape == b.shape and a is ref[3]:
                b = b * torch.sign((a * b).sum(1, keepdim=True))
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_tiny_budget_keeps_factors_lazy(monkeypatch):
    """With a tiny budget the large factors are never formed whole."""
    problem = make_problem(NETS["pool-net"])
    created = []
    real = LazyColumns.__init__

    def spy(self, *args, **kwargs):
        created.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(LazyColumns, "__init__", spy)
    _quiet_run(problem, vivitlib.LowRankGGN(problem.params, max_memory=1))
    assert created


def test_budget_below_a_layers_needs_warns_with_the_minimum():
    problem = make_problem(NETS["pool-net"])
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=1)
    with pytest.warns(MemoryBudgetWarning, match="Raise max_memory to at least"):
        problem.run(ggn)
    assert ggn.blocks[0].evals.numel() > 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), ("512MiB", 512 * 2**20), ("1.5 GB", 1_500_000_000),
     ("2gib", 2 * 2**30), ("100", 100), ("64 kB", 64_000)],
)  # fmt: skip
def test_parse_memory(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(0, ValueError, "must be positive"), (-5, ValueError, "must be positive"),
     ("0MiB", ValueError, "must be positive"), ("lots", ValueError, "not a memory size"),
     ("12 parsecs", ValueError, "not a memory size"), (1.5e9, TypeError, "float"),
     (True, TypeError, "int"), ([1], TypeError, "int")],
)  # fmt: skip
def test_bad_budgets_raise_before_anything_runs(value, error, match):
    problem = make_problem(NETS["pool-net"])
    for p in problem.params:
        p.grad = torch.ones_like(p)
    with pytest.raises(error, match=match):
        vivitlib.LowRankGGN(problem.params, max_memory=value)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in problem.params)


def test_budget_shares():
    budget = MemoryBudget.split(2**20)
    assert budget.lazy_bytes == 2**17
    assert budget.column_bytes == 2**16
    assert budget.cost_settings(4)["materialise_elements"] == 2**16
    assert budget.cost_settings(4)["chunk_elements"] == 2**15
    assert MemoryBudget.split(None).cost_settings(4) == {}


def test_announced_lifts_reach_the_cost_model():
    from vivitlib.factors import current_cost_model
    from vivitlib.memory import memory_budget

    assert MemoryBudget.split(None, lifted_vectors=1).cost_settings(4) == {
        "lifted_vectors": 1
    }
    budget = MemoryBudget.split(2**20, lifted_vectors=3)
    assert budget.cost_settings(4)["lifted_vectors"] == 3
    with memory_budget(budget):
        assert current_cost_model().lifted_vectors == 3
    assert current_cost_model().lifted_vectors is None


def _wide_conv_net():
    """A convolution whose dense V outweighs its output factor, after max pooling."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2, padding=1),
        nn.Conv2d(6, 5, 1), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3),
    )  # fmt: skip


@pytest.mark.parametrize("compute", [("eigenvalues",), vivitlib.QUANTITIES])
@pytest.mark.parametrize("plan", ["dense", "pairwise"])
def test_channel_slices_match_dense(monkeypatch, plan, compute):
    """The second convolution's factor is formed a channel slice at a time."""
    from vivitlib.extensions import lazy_factor
    from vivitlib.factors import cost_model

    problem = make_problem(dict(model=_wide_conv_net, loss=nn.CrossEntropyLoss,
                                x=(4, 2, 10, 10), y=_targets))  # fmt: skip
    made = []
    real = lazy_factor.ChannelSlicedFactor.__init__
    monkeypatch.setattr(
        lazy_factor.ChannelSlicedFactor,
        "__init__",
        lambda self, *a, **k: made.append(1) or real(self, *a, **k),
    )
    narrowed = []
    real_narrowed = conv_backprop._ConvSnapshot.narrowed
    monkeypatch.setattr(
        conv_backprop._ConvSnapshot,
        "narrowed",
        lambda self, *a: narrowed.append(1) or real_narrowed(self, *a),
    )
    ggn = vivitlib.LowRankGGN(problem.params, compute=compute, max_memory=1)
    with cost_model(gram_plan=plan):
        (block,) = _quiet_run(problem, ggn)
        if compute == ("eigenvalues",):
            reference = vivitlib.LowRankGGN(problem.params, compute=compute)
            (ref,) = _quiet_run(problem, reference)
            torch.testing.assert_close(block.evals, ref.evals, rtol=1e-10, atol=0)
        else:
            assert_block_matches_dense(block, problem.dense())
    assert bool(made) == (plan == "dense")
    # the channels of the second convolution's factor come through the third's Jᵀ
    assert bool(narrowed) == (plan == "dense")


def _spy_rules(monkeypatch) -> list:
    """Record the module classes whose square-root-GGN rule runs."""
    from backpack.extensions.module_extension import ModuleExtension

    seen = []
    real = ModuleExtension.__call__

    def spy(self, ext, module, g_inp, g_out):
        if isinstance(ext, GGNFactorExtension):
            seen.append(type(module))
        return real(self, ext, module, g_inp, g_out)

    monkeypatch.setattr(ModuleExtension, "__call__", spy)
    return seen


def test_backprop_stops_below_the_last_grouped_parameter(monkeypatch):
    """Curvature of the last layers only: the convolutions are never reached."""
    problem = make_problem(NETS["pool-net"])
    head = list(problem.model[-3].parameters()) + list(problem.model[-1].parameters())
    seen = _spy_rules(monkeypatch)
    ggn = vivitlib.LowRankGGN(head)
    problem.run(ggn)
    assert nn.Conv2d not in seen and nn.MaxPool2d not in seen
    assert_block_matches_dense(ggn.blocks[0], problem.dense(head))


def test_tied_weights_keep_the_whole_backprop(monkeypatch):
    """A parameter used twice must be reached twice: no early stop (and an error)."""
    shared = nn.Linear(4, 4).double()
    model = extend(nn.Sequential(nn.Linear(3, 4).double(), shared, nn.Tanh(), shared,
                                 nn.Linear(4, 3).double()))  # fmt: skip
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    ggn = vivitlib.LowRankGGN(list(shared.parameters()), compute="eigenvalues")
    with pytest.raises(Exception, match="twice|tied"):
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            loss_fn(model(X), y).backward()


def test_newton_step_with_one_announced_lift_matches_dense():
    """A pass without eigenvectors announces one lifted vector (the Newton
    step) and keeps the convolutions' factors outer instead of dense (as a pass
    with eigenvectors does), with the same numbers."""
    from vivitlib.factors import UnfoldedFactor

    problem = make_problem(dict(model=_wide_conv_net, loss=nn.CrossEntropyLoss,
                                x=(4, 2, 10, 10), y=_targets))  # fmt: skip
    newton_only = ("eigenvalues", "directional_derivatives", "newton_step")
    kept = {}
    for lifts, compute in ((None, newton_only + ("eigenvectors",)), (1, newton_only)):
        ggn = vivitlib.LowRankGGN(problem.params, compute=compute)
        assert ggn._budget.lifted_vectors == lifts
        (kept[lifts],) = _quiet_run(problem, ggn)
        factors = ggn._pass.accumulators[0].factors.values()
        outer = [f for f in factors if isinstance(f, UnfoldedFactor)]
        assert len(outer) == (2 if lifts == 1 else 0)
    for damping in (1e-3, 1.0):
        steps = zip(kept[1].newton_step(damping), kept[None].newton_step(damping))
        for a, b in steps:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert_block_matches_dense(kept[1], problem.dense())
