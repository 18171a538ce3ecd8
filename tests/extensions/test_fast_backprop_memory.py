"""Free heap released before a fast rule's large output (issue 13, memory)."""

import pytest
import torch
from backpack import backpack, extend
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from torch import nn

from vivitlib.extensions import conv_backprop, fast_backprop, heap

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
    monkeypatch.setattr(heap, "release_free_heap", lambda: seen.append(1))
    return seen


def test_large_output_releases_heap_first_and_keeps_backpacks_numbers(
    monkeypatch, calls
):
    module, mat = _pool_and_factor()
    monkeypatch.setattr(heap, "RELEASE_HEAP_BYTES", 0)
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
    assert heap.RELEASE_HEAP_BYTES == 32 * 2**20


def test_release_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_heap() is False


def test_release_touches_no_tensor():
    x = torch.randn(1000, dtype=torch.float64)
    before = x.clone()
    called = heap.release_free_heap()
    assert isinstance(called, bool)
    assert torch.equal(x, before)


CONVS = {
    "conv1d-stride-pad": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)),
    "conv2d-dilated": (lambda: nn.Conv2d(2, 3, (3, 2), padding=(1, 0), dilation=2),
                       (2, 7, 6)),
    "conv2d-groups-odd-stride": (lambda: nn.Conv2d(4, 6, 3, stride=3, groups=2),
                                 (4, 8, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 4, 5, 3)),
}  # fmt: skip


def _conv_and_factor(name: str, N: int = 4, columns: int = 5):
    factory, shape = CONVS[name]
    torch.manual_seed(1)
    module = extend(factory().double())
    x = torch.randn(N, *shape, dtype=torch.float64, requires_grad=True)
    with backpack():
        out = module(x)
    return module, torch.randn(columns, *out.shape, dtype=torch.float64)


@pytest.mark.parametrize("subsampling", [None, [3, 0]], ids=["all", "subsampled"])
@pytest.mark.parametrize("chunk_columns", [1, 2, 5])
@pytest.mark.parametrize("name", CONVS)
def test_column_chunked_conv_equals_backpack(
    monkeypatch, name, chunk_columns, subsampling
):
    module, mat = _conv_and_factor(name)
    if subsampling is not None:
        mat = mat[:, subsampling]
    fast = conv_backprop.FAST_CONV_DERIVATIVES[type(module)]
    stock = fast.__mro__[1]
    assert stock.__module__.startswith("backpack.")
    column_bytes = mat.shape[1] * module.input0[0].numel() * mat.element_size()
    monkeypatch.setattr(conv_backprop, "CONV_CHUNK_BYTES", chunk_columns * column_bytes)
    args = (module, None, None, mat)
    out = fast().jac_t_mat_prod(*args, subsampling=subsampling)
    ref = stock().jac_t_mat_prod(*args, subsampling=subsampling)
    assert out.shape == ref.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


def test_conv_chunks_bound_the_batch_of_each_transposed_convolution(monkeypatch):
    module, mat = _conv_and_factor("conv2d-dilated", columns=7)
    column_bytes = mat.shape[1] * module.input0[0].numel() * mat.element_size()
    monkeypatch.setattr(conv_backprop, "CONV_CHUNK_BYTES", 3 * column_bytes)
    batches = []
    real = torch.nn.functional.conv_transpose2d

    def spy(input, *args, **kwargs):
        batches.append(input.shape[0])
        return real(input, *args, **kwargs)

    fast = conv_backprop.FAST_CONV_DERIVATIVES[nn.Conv2d]()
    monkeypatch.setattr(fast, "conv_transpose_func", spy)
    released = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: released.append(1))
    fast.jac_t_mat_prod(module, None, None, mat)
    N = mat.shape[1]
    assert batches == [3 * N, 3 * N, N]
    assert released == [1]  # once, after the chunks


def test_unchunked_conv_does_not_release(monkeypatch, calls):
    module, mat = _conv_and_factor("conv3d")
    conv_backprop.FAST_CONV_DERIVATIVES[nn.Conv3d]().jac_t_mat_prod(
        module, None, None, mat
    )
    assert calls == []
