"""Lazy factors (source + pending maps) equal BackPACK's formed ones (issue 13)."""

import pytest
import torch
from backpack import backpack, extend
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.flatten import FlattenDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from torch import nn

from vivitlib.extensions.conv_backprop import FAST_CONV_DERIVATIVES
from vivitlib.extensions.fast_backprop import FAST_DERIVATIVES
from vivitlib.extensions.lazy import LazyColumns
from vivitlib.memory import MemoryBudget, memory_budget

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

STOCK = {nn.Conv2d: Conv2DDerivatives, nn.ReLU: ReLUDerivatives,
         nn.MaxPool2d: MaxPool2DDerivatives, nn.Flatten: FlattenDerivatives}  # fmt: skip


@pytest.fixture
def chain():
    """conv → ReLU → max pool → conv → ReLU → flatten, after one extended forward."""
    torch.manual_seed(0)
    net = extend(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, padding=1),
        nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(),
    ).double())  # fmt: skip
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    with backpack():
        out = net(x)
    mat = torch.randn(7, *out.shape, dtype=torch.float64)
    return list(net)[::-1], mat


def _rule(module):
    table = FAST_CONV_DERIVATIVES if isinstance(module, nn.Conv2d) else FAST_DERIVATIVES
    return table[type(module)]()


@pytest.mark.parametrize("subsampling", [None, [4, 1]], ids=["all", "subsampled"])
@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
def test_lazy_chain_equals_backpack(chain, depth, subsampling):
    modules, mat = chain
    if subsampling is not None:
        mat = mat[:, subsampling]
    lazy, formed = LazyColumns(mat), mat
    for module in modules[:depth]:
        lazy = lazy.then(_rule(module).column_op(module, subsampling=subsampling))
        formed = STOCK[type(module)]().jac_t_mat_prod(
            module, None, None, formed, subsampling=subsampling
        )
    assert lazy.shape == formed.shape
    torch.testing.assert_close(lazy.materialise(), formed, rtol=1e-12, atol=1e-14)
    with memory_budget(MemoryBudget.split(1)):  # one column at a time
        torch.testing.assert_close(lazy.materialise(), formed, rtol=1e-12, atol=1e-14)
    channels = formed.shape[2]
    for o0, o1 in [(0, 1), (1, channels), (0, channels)]:
        torch.testing.assert_close(
            lazy.channels(o0, o1), formed[:, :, o0:o1], rtol=1e-12, atol=1e-14
        )
    # the source is never overwritten by the in-place maps
    assert torch.equal(lazy.source, mat)
