"""Eval-mode batch norm: BackPACK's numbers, lazy factors kept lazy (issue 13).

The rule (:mod:`vivitlib.extensions.batch_norm`) scales the factor by
broadcasting and, given a lazy factor, appends the scale and takes the
parameters' channel sums a column chunk at a time (ahead of a max pooling
scatter). Every network runs against the dense float64 reference, with and
without budgets that make the factors at the batch norm layers lazy.
"""

import warnings

import pytest
import torch
from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense, layerwise_results
from vivitlib.extensions.batch_norm import FastBatchNormDerivatives, SqrtGGNBatchNorm
from vivitlib.extensions.lazy import LazyColumns
from vivitlib.memory import MemoryBudgetWarning


def _randomise(net: nn.Module) -> nn.Module:
    """Stored statistics and affine parameters away from their defaults; eval mode."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _conv_bn_pool():
    """Conv → BN → ReLU → max pooling: the factor at BN is lazy behind a scatter."""
    return _randomise(nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2), nn.ELU(), nn.Flatten(), nn.Linear(2, 3),
    ))  # fmt: skip


def _conv_bn_conv():
    """Conv → BN → ReLU → conv: the factor at BN is lazy behind a conv's ``Jᵀ``."""
    return _randomise(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2), nn.BatchNorm2d(3), nn.Tanh(),
        nn.Flatten(), nn.Linear(27, 3),
    ))  # fmt: skip


def _conv1d_bn_overlapping_pool():
    """1-D: BN1d on ``[N, C, L]`` before overlapping max pooling windows."""
    return _randomise(nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Sigmoid(), nn.MaxPool1d(3, stride=2),
        nn.Flatten(), nn.Linear(12, 3),
    ))  # fmt: skip


def _affine_free_bn():
    """BN without ``γ`` and ``β`` (BackPACK's rule refuses it): only the scale."""
    return _randomise(nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12, 3),
    ))  # fmt: skip


def _conv3d_bn_pool():
    """3-D: BN3d before max pooling and a second batch norm behind a conv."""
    return _randomise(nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(2, 2, 1), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(16, 3),
    ))  # fmt: skip


def _wide_linear_bn():
    """A linear layer wider at its input (its ``Jᵀ`` kept pending) above BN1d."""
    return _randomise(nn.Sequential(
        nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 2), nn.BatchNorm1d(2),
        nn.LeakyReLU(), nn.Linear(2, 3),
    ))  # fmt: skip


def _targets(n):
    return torch.randint(0, 3, (n,))


NETS = {
    "conv-bn-pool": dict(model=_conv_bn_pool, loss=nn.CrossEntropyLoss,
                         x=(4, 2, 7, 7), y=_targets),
    "conv-bn-conv": dict(model=_conv_bn_conv, loss=nn.CrossEntropyLoss,
                         x=(3, 2, 7, 7), y=_targets),
    "conv1d-bn-pool": dict(model=_conv1d_bn_overlapping_pool, loss=nn.MSELoss,
                           x=(4, 2, 12), y=lambda n: torch.randn(n, 3)),
    "linear-bn1d": dict(model=_wide_linear_bn, loss=nn.CrossEntropyLoss,
                        x=(5, 3), y=_targets),
    "conv3d-bn-pool": dict(model=_conv3d_bn_pool, loss=nn.CrossEntropyLoss,
                           x=(3, 1, 5, 5, 5), y=_targets),
    "affine-free-bn": dict(model=_affine_free_bn, loss=nn.CrossEntropyLoss,
                           x=(4, 2, 6, 6), y=_targets),
}  # fmt: skip


def _run(problem, ggn) -> list[str]:
    """Run the pass; the budget warnings' messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemoryBudgetWarning)
        problem.run(ggn)
    return [str(w.message) for w in caught if w.category is MemoryBudgetWarning]


@pytest.mark.parametrize("budget", [None, 1, 3000])
@pytest.mark.parametrize("name", NETS)
def test_pass_matches_dense(name, budget):
    problem = make_problem(NETS[name])
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=budget)
    _run(problem, ggn)
    assert_block_matches_dense(ggn.blocks[0], problem.dense())


@pytest.mark.parametrize(
    "name", ["conv-bn-pool", "conv-bn-conv", "conv1d-bn-pool", "conv3d-bn-pool"]
)
def test_lazy_factor_is_not_formed_at_batch_norm(name, monkeypatch):
    """Under a tiny budget no batch norm layer forms its lazy factor whole.

    Neither before its rule (the extension would, for a rule refusing lazy
    factors) nor inside it: every lazy factor reaching the rule leaves it
    lazy, and nothing in it forms a whole factor.
    """
    problem = make_problem(NETS[name])
    reached, formed, inside = [], [], []
    real_materialise = LazyColumns.materialise

    def materialise(self):
        formed.append(bool(inside))
        return real_materialise(self)

    def spied(method):
        def run(self, ext, module, g_inp, g_out, backproped):
            if isinstance(backproped, LazyColumns):
                reached.append(method.__name__)
            inside.append(1)
            try:
                result = method(self, ext, module, g_inp, g_out, backproped)
            finally:
                inside.pop()
            if method.__name__ == "backpropagate" and reached:
                assert isinstance(result, LazyColumns)
            return result

        return run

    for name_ in ("weight", "bias", "backpropagate"):
        method = getattr(SqrtGGNBatchNorm, name_)
        monkeypatch.setattr(SqrtGGNBatchNorm, name_, spied(method))
    monkeypatch.setattr(LazyColumns, "materialise", materialise)
    messages = _run(problem, vivitlib.LowRankGGN(problem.params, max_memory=1))
    assert "backpropagate" in reached and "weight" in reached, "no lazy factor at BN"
    assert not any(formed), "a batch norm rule formed a lazy factor whole"
    assert not [m for m in messages if "BatchNorm" in m], messages


@pytest.mark.parametrize("name", ["conv-bn-pool", "conv-bn-conv", "conv3d-bn-pool"])
def test_float32_pass_equals_float64(name):
    """The lazy rule in float32: the float64 numbers to float32 round-off."""
    problem = make_problem(NETS[name])
    reference = vivitlib.LowRankGGN(problem.params, max_memory=1)
    _run(problem, reference)
    expected = reference.blocks[0]
    expected_step = torch.cat([s.flatten() for s in expected.newton_step(0.1)])
    expected_evals = expected.evals
    problem.model.float()
    problem.X = problem.X.float()
    if problem.y.is_floating_point():
        problem.y = problem.y.float()
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=1)
    _run(problem, ggn)
    got = ggn.blocks[0]
    K = min(len(expected_evals), got.num_directions, 5)
    torch.testing.assert_close(
        got.evals[:K].double(), expected_evals[:K], rtol=1e-4, atol=1e-6
    )
    step = torch.cat([s.flatten().double() for s in got.newton_step(0.1)])
    torch.testing.assert_close(step, expected_step, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("budget", [None, 1])
def test_one_batch_norm_parameter(frozen, budget):
    """Only the wanted one of ``γ``, ``β`` gets a factor; the numbers stay exact."""
    problem = make_problem(NETS["conv-bn-pool"])
    getattr(problem.model[1], frozen).requires_grad_(False)
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=budget)
    _run(problem, ggn)
    assert_block_matches_dense(ggn.blocks[0], problem.dense(problem.params))


@pytest.mark.parametrize("budget", [1, 3000])
def test_group_without_batch_norm_parameters(budget):
    """A group of conv weights only: BN passes the factor on, computes no sums."""
    problem = make_problem(NETS["conv-bn-conv"])
    params = [problem.model[0].weight, problem.model[3].weight]
    ggn = vivitlib.LowRankGGN(params, max_memory=budget)
    _run(problem, ggn)
    assert_block_matches_dense(ggn.blocks[0], problem.dense(params))


@pytest.mark.parametrize("name", ["conv-bn-pool", "conv-bn-conv"])
def test_monte_carlo_and_subsampling_unchanged_by_budget(name):
    options = dict(mc_samples=2, subsampling=[2, 0], grad_subsampling=[1, 2])
    problem = make_problem(NETS[name])
    reference = layerwise_results(problem, **options)
    budgeted = layerwise_results(problem, max_memory=1, **options)
    for ref, got in zip(reference, budgeted, strict=True):
        for a, b in zip(ref[:3], got[:3], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "shape", [(5, 4), (5, 4, 6), (3, 4, 5, 6), (2, 4, 3, 3, 2)], ids=len
)
def test_derivatives_equal_backpacks(shape):
    """``Jᵀ`` by broadcasting and as a pending map: BackPACK's einsum numbers."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    module = _randomise(cls[len(shape)](shape[1]).double())
    module.input0 = torch.randn(*shape, dtype=torch.float64)
    mat = torch.randn(3, *shape, dtype=torch.float64)
    expected = BatchNormNdDerivatives()._jac_t_mat_prod(module, None, None, mat)
    fast = FastBatchNormDerivatives()
    torch.testing.assert_close(fast._jac_t_mat_prod(module, None, None, mat), expected)
    lazy = LazyColumns(mat).then(fast.column_op(module))
    torch.testing.assert_close(lazy.materialise(), expected)
    torch.testing.assert_close(lazy.columns(1, 3, samples=(1, 2)), expected[1:, 1:2])
    torch.testing.assert_close(lazy.channels(1, 3), expected[:, :, 1:3])
    sub = [1, 0]
    op = fast.column_op(module, subsampling=sub)
    got = LazyColumns(mat[:, sub]).then(op).materialise()
    torch.testing.assert_close(got, expected[:, sub])
