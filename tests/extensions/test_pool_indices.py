"""Max pooling's indices come from autograd's graph, not a second pooling (issue 13)."""

import pytest
import torch
from backpack import backpack, extend
from backpack.core.derivatives.maxpoolnd import MaxPoolNDDerivatives
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense, flat_evecs
from vivitlib.extensions import GGNFactorExtension
from vivitlib.extensions.pool_indices import PoolingIndices

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore::vivitlib.memory.MemoryBudgetWarning"
)


@pytest.fixture
def recomputed(monkeypatch):
    """Record every recomputation of pooling indices (BackPACK's own rule)."""
    calls = []
    real = MaxPoolNDDerivatives.get_pooling_idx

    def spy(self, module, subsampling=None):
        calls.append(type(module))
        return real(self, module, subsampling=subsampling)

    monkeypatch.setattr(MaxPoolNDDerivatives, "get_pooling_idx", spy)
    return calls


def _pool_net(dim: int):
    conv, pool = {1: (nn.Conv1d, nn.MaxPool1d), 2: (nn.Conv2d, nn.MaxPool2d),
                  3: (nn.Conv3d, nn.MaxPool3d)}[dim]  # fmt: skip
    features = {1: 3 * 4, 2: 3 * 4 * 4, 3: 3 * 2 * 2 * 2}[dim]
    size = {1: 7, 2: 7, 3: 4}[dim]

    def model():
        return nn.Sequential(
            conv(2, 3, 3, padding=1), nn.ReLU(), pool(3, 2, padding=1),
            nn.Flatten(), nn.Linear(features, 3),
        )  # fmt: skip

    return dict(model=model, loss=nn.CrossEntropyLoss, x=(5, 2, *[size] * dim),
                y=lambda n: torch.randint(0, 3, (n,)))  # fmt: skip


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("subsampling", [None, [4, 1, 2]], ids=["all", "sub"])
def test_pass_reuses_autograds_indices(dim, subsampling, recomputed):
    problem = make_problem(_pool_net(dim))
    ggn = vivitlib.LowRankGGN(problem.params, subsampling=subsampling)
    problem.run(ggn)
    assert recomputed == []
    if subsampling is None:
        assert_block_matches_dense(ggn.blocks[0], problem.dense())
    else:  # against the same pass with the indices recomputed
        assert not ggn.extensions[0].pool_indices._saved  # all handed over
        got = _results(ggn.blocks[0])
        reference = vivitlib.LowRankGGN(problem.params, subsampling=subsampling)
        reference.extensions[0].pool_indices.collect = lambda root: None
        problem.run(reference)
        assert recomputed
        ref = _results(reference.blocks[0])
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=0)
        sign = torch.sign((got[2] * ref[2]).sum(1, keepdim=True))
        torch.testing.assert_close(got[1] * sign.T, ref[1])
        torch.testing.assert_close(got[2] * sign, ref[2])


def _results(block):
    return block.evals, block.gammas, flat_evecs(block)


def test_one_dimensional_pooling_recomputes_them(recomputed):
    """1-D pooling runs as a 2-D one in autograd: no node of its own to read."""
    problem = make_problem(_pool_net(1))
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    assert recomputed == [nn.MaxPool1d]
    # the 2-D node autograd saved is not kept past the backward pass
    assert not ggn.extensions[0].pool_indices._saved
    assert_block_matches_dense(ggn.blocks[0], problem.dense())


def test_monte_carlo_pass_reuses_them(recomputed):
    problem = make_problem(_pool_net(2))

    def evals(**kwargs):
        ggn = vivitlib.LowRankGGN(
            problem.params, mc_samples=3, generator=torch.Generator().manual_seed(0),
            **kwargs,
        )  # fmt: skip
        problem.run(ggn)
        return ggn.blocks[0].evals

    budgeted = evals(max_memory=1)  # lazy: the indices captured by a pending map
    assert recomputed == []
    default = evals()
    torch.testing.assert_close(budgeted, default, rtol=1e-10, atol=0)


def test_indices_of_a_node_already_run_are_not_used():
    """Saved tensors released by autograd: nothing collected, no error."""
    torch.manual_seed(0)
    pool = nn.MaxPool2d(2)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = pool(x)
    out.sum().backward()
    indices = PoolingIndices()
    indices.collect(out)
    assert not indices._saved


def test_indices_match_the_module_output():
    torch.manual_seed(0)
    pool = extend(nn.MaxPool2d(3, 2, padding=1))
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    with backpack():
        out = pool(x)
    indices = PoolingIndices()
    indices.collect(out * 2)
    expected = nn.functional.max_pool2d(x, 3, 2, padding=1, return_indices=True)[1]
    assert torch.equal(indices.take(pool), expected)
    assert indices.take(pool) is None  # handed over once


def test_aborted_pass_drops_the_indices():
    problem = make_problem(_pool_net(2))
    ggn = vivitlib.LowRankGGN(problem.params)
    extension: GGNFactorExtension = ggn.extensions[0]
    real = extension._call

    def fail_at_linear(module, g_inp, g_out):
        real(module, g_inp, g_out)
        if isinstance(module, nn.Linear):
            raise RuntimeError("boom")

    extension._call = fail_at_linear
    with pytest.raises(RuntimeError, match="boom"):
        problem.run(ggn)
    assert not extension.pool_indices._saved


def test_early_stop_drops_the_indices():
    problem = make_problem(_pool_net(2))
    head = list(problem.model[-1].parameters())
    ggn = vivitlib.LowRankGGN(head)
    problem.run(ggn)
    assert not ggn.extensions[0].pool_indices._saved
    assert_block_matches_dense(ggn.blocks[0], problem.dense(head))
