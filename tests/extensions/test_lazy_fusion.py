"""Lazy factors: ReLU ahead of max pooling's scatter, and per-channel sums (issue 13).

A ReLU after max pooling's ``Jᵀ`` on a lazy factor runs before the scatter, on
the pooled values at their target pixels; per-channel sums skip a trailing
scatter. Checked against the unfused chain (bit for bit) and stock BackPACK.
"""

import pytest
import torch
from backpack import backpack, extend
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from torch import nn

from vivitlib.extensions.fast_backprop import FAST_DERIVATIVES
from vivitlib.extensions.lazy import LazyColumns
from vivitlib.memory import MemoryBudget, memory_budget

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _relu_pool(pool: nn.Module):
    """ReLU → pool after one extended forward; modules in BackPACK's order."""
    torch.manual_seed(0)
    relu, pool = extend(nn.ReLU()), extend(pool)
    x = torch.randn(4, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    with backpack():
        out = pool(relu(x))
    mat = torch.randn(5, *out.shape, dtype=torch.float64)
    mat[mat.abs() < 0.3] = 0  # exact zeros in the factor too
    return pool, relu, mat


def _op(module, subsampling=None):
    return FAST_DERIVATIVES[type(module)]().column_op(module, subsampling=subsampling)


POOLS = {
    "overlapping": lambda: nn.MaxPool2d(3, 2, padding=1),
    "disjoint": lambda: nn.MaxPool2d(2),
    "dilated-ceil": lambda: nn.MaxPool2d(2, 1, dilation=2, ceil_mode=True),
}


@pytest.mark.parametrize("subsampling", [None, [3, 0]], ids=["all", "sub"])
@pytest.mark.parametrize("pool", POOLS)
def test_relu_runs_before_the_scatter_with_the_same_numbers(pool, subsampling):
    pool, relu, mat = _relu_pool(POOLS[pool]())
    if subsampling is not None:
        mat = mat[:, subsampling]
    unpool = _op(pool, subsampling)
    lazy = LazyColumns(mat).then(unpool).then(_op(relu, subsampling))
    assert lazy.ops[-1] is unpool  # the ReLU moved ahead of the scatter
    assert lazy.ops[0].shape == tuple(mat.shape[1:])
    unfused = LazyColumns(LazyColumns(mat).then(unpool).materialise())
    unfused = unfused.then(_op(relu, subsampling)).materialise()
    assert torch.equal(lazy.materialise(), unfused)
    pooled = MaxPool2DDerivatives().jac_t_mat_prod(
        pool, None, None, mat, subsampling=subsampling
    )
    stock = ReLUDerivatives().jac_t_mat_prod(
        relu, None, None, pooled, subsampling=subsampling
    )
    torch.testing.assert_close(lazy.materialise(), stock, rtol=0, atol=0)
    for o0, o1 in [(0, 1), (1, 3)]:
        assert torch.equal(lazy.channels(o0, o1), unfused[:, :, o0:o1])
    assert torch.equal(lazy.source, mat)


@pytest.mark.parametrize("budget", [MemoryBudget(), MemoryBudget(column_bytes=1)])
@pytest.mark.parametrize("fused", [True, False])
def test_channel_sums_skip_the_trailing_scatter(fused, budget):
    pool, relu, mat = _relu_pool(POOLS["overlapping"]())
    lazy = LazyColumns(mat).then(_op(pool))
    if fused:
        lazy = lazy.then(_op(relu))
    calls = []
    scatter = lazy.ops[-1]
    real = scatter.fn
    object.__setattr__(scatter, "fn", lambda x, f: calls.append(1) or real(x, f))
    expected = lazy.materialise().flatten(3).sum(3)
    calls.clear()
    with memory_budget(budget):
        sums = lazy.channel_sums()
    assert calls == []  # the pooling's input already has the sums
    torch.testing.assert_close(sums, expected, rtol=1e-13, atol=1e-13)
