"""Free heap released before a fast rule's large output (issue 13, memory)."""

import pytest
import torch
from backpack import backpack, extend
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from torch import nn

from vivitlib.extensions import fast_backprop

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _pool_and_factor(N: int = 3, columns: int = 4):
    torch.manual_seed(0)
    module = extend(nn.MaxPool2d(3, 2, padding=1))
    x = torch.randn(N, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    with backpack():
        out = module(x)
    return module, torch.randn(columns, *out.shape, dtype=torch.float64)


def _stock_pool(module, mat):
    return MaxPool2DDerivatives().jac_t_mat_prod(module, None, None, mat)


@pytest.fixture
def calls(monkeypatch):
    """Count calls of :func:`release_free_heap` made by the rules."""
    seen = []
    monkeypatch.setattr(fast_backprop, "release_free_heap", lambda: seen.append(1))
    return seen


def test_large_output_releases_heap_first_and_keeps_backpacks_numbers(
    monkeypatch, calls
):
    module, mat = _pool_and_factor()
    monkeypatch.setattr(fast_backprop, "RELEASE_HEAP_BYTES", 0)
    out = fast_backprop.jac_t_mat_prod(module, mat)
    assert calls == [1]
    torch.testing.assert_close(out, _stock_pool(module, mat), rtol=1e-12, atol=0)


def test_small_output_does_not_release(calls):
    module, mat = _pool_and_factor()
    fast_backprop.jac_t_mat_prod(module, mat)
    assert calls == []


def test_release_threshold_is_the_glibc_mmap_ceiling():
    # blocks below glibc's largest dynamic mmap threshold (32 MiB) may stay in
    # the heap after being freed; a larger output is always mapped afresh
    assert fast_backprop.RELEASE_HEAP_BYTES == 32 * 2**20


def test_release_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(fast_backprop, "_malloc_trim", lambda: None)
    assert fast_backprop.release_free_heap() is False


def test_release_touches_no_tensor():
    x = torch.randn(1000, dtype=torch.float64)
    before = x.clone()
    called = fast_backprop.release_free_heap()
    assert isinstance(called, bool)
    assert torch.equal(x, before)
