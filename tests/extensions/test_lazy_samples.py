"""Lazy factors formed a block of samples at a time (issue 13).

Every pending map acts on each sample alone, so ``columns(c0, c1, samples=(n0,
n1))`` must equal ``columns(c0, c1)[:, n0:n1]``: checked on lazy factors built
from real extended forward passes (convolutions 1-D/2-D/3-D, strided, dilated,
padded, grouped; ReLU, other activations, dropout; disjoint and overlapping
max pooling; flatten; sub-sampled samples) and on every lazy factor a whole
``max_memory=1`` pass creates (Monte-Carlo, sub-sampling). The columns
themselves are checked against BackPACK in ``test_fast_backprop_lazy.py``.
"""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from vivitlib.extensions.conv_backprop import FAST_CONV_DERIVATIVES
from vivitlib.extensions.fast_backprop import FAST_DERIVATIVES
from vivitlib.extensions.lazy import LazyColumns, PendingOp
from vivitlib.factors import cost_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore::vivitlib.memory.MemoryBudgetWarning"
)

N = 5

#: name -> (layers before the linear head, input shape without N, train mode)
CHAINS = {
    "cnn2d": (lambda: [
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2), nn.ReLU(), nn.MaxPool2d(2, padding=1), nn.Flatten(),
    ], (2, 8, 8), False),
    "strided-dilated-activations": (lambda: [
        nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), nn.Sigmoid(),
        nn.Conv2d(4, 4, 2, groups=2), nn.Tanh(), nn.Dropout(0.3),
        nn.MaxPool2d(3, stride=1), nn.LeakyReLU(), nn.Flatten(),
    ], (2, 9, 9), False),
    "overlapping-pool-1d": (lambda: [
        nn.Conv1d(2, 3, 3, stride=2), nn.ELU(), nn.MaxPool1d(3, stride=2, padding=1),
        nn.Conv1d(3, 2, 2, dilation=2), nn.ReLU(), nn.MaxPool1d(3, stride=1),
        nn.Flatten(),
    ], (2, 19), False),
    "pool-3d": (lambda: [
        nn.Conv3d(1, 2, 2, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(2, 2, 2), nn.SELU(), nn.Flatten(),
    ], (1, 5, 5, 5), False),
    "dropout-train": (lambda: [
        nn.Conv2d(2, 3, 3), nn.Dropout(0.5), nn.ReLU(), nn.MaxPool2d(2),
        nn.LogSigmoid(), nn.Flatten(),
    ], (2, 7, 7), True),
}  # fmt: skip

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _extended(name):
    """The chain after one extended forward, its input and a factor at its output."""
    layers, shape, train = CHAINS[name]
    torch.manual_seed(0)
    net = extend(nn.Sequential(*layers()).double().train(train))
    x = torch.randn(N, *shape, dtype=torch.float64, requires_grad=True)
    with backpack():
        out = net(x)
    return net, x, torch.randn(4, *out.shape, dtype=torch.float64)


def _forward(name):
    """The chain's modules in BackPACK order (reversed) and a factor at its output."""
    net, _, mat = _extended(name)
    return list(net)[::-1], mat


def _lazy(modules, mat, subsampling=None):
    """Every prefix of the chain as a lazy factor (the maps BackPACK's pass appends)."""
    lazy, prefixes = LazyColumns(mat), [LazyColumns(mat)]
    for module in modules:
        table = FAST_CONV_DERIVATIVES if isinstance(module, CONVS) else FAST_DERIVATIVES
        with torch.no_grad():  # as in BackPACK's backward hooks
            op = table[type(module)]().column_op(module, subsampling=subsampling)
        if op is not None:
            lazy = lazy.then(op)
            prefixes.append(lazy)
    return prefixes


def _blocks(n):
    """Size-1 blocks, blocks of 2 with a partial last one, and all samples."""
    ranges = [(i, i + 1) for i in range(n)]
    ranges += [(i, min(n, i + 2)) for i in range(0, n, 2)]
    return ranges + [(0, n), (1, n)]


def _assert_sample_blocks_match(lazy):
    assert lazy.sample_narrowable
    source = lazy.source.clone()
    C, n = lazy.shape[:2]
    for c0, c1 in [(0, C), (1, min(C, 3))]:
        whole = lazy.columns(c0, c1)
        for n0, n1 in _blocks(n):
            block = lazy.columns(c0, c1, samples=(n0, n1))
            assert block.shape == (c1 - c0, n1 - n0, *lazy.shape[2:])
            torch.testing.assert_close(block, whole[:, n0:n1], rtol=1e-12, atol=1e-14)
    assert torch.equal(lazy.source, source)  # never overwritten in place


@pytest.mark.parametrize("subsampling", [None, [4, 1, 3]], ids=["all", "subsampled"])
@pytest.mark.parametrize("name", list(CHAINS))
def test_sample_blocks_equal_the_whole_columns(name, subsampling):
    modules, mat = _forward(name)
    if subsampling is not None:
        mat = mat[:, subsampling]
    prefixes = _lazy(modules, mat, subsampling)
    assert len(prefixes) > 4
    for lazy in prefixes:
        _assert_sample_blocks_match(lazy)


@pytest.mark.parametrize("name", [n for n in CHAINS if not CHAINS[n][2]])
def test_sample_blocks_equal_the_dense_transposed_jacobian(name):
    """Against autograd's VJPs of the whole chain (eval mode: deterministic)."""
    net, x, mat = _extended(name)
    lazy = _lazy(list(net)[::-1], mat)[-1]  # captures what it needs
    out = net(x)  # outside backpack(), which drops the modules' stored inputs
    dense = torch.stack(
        [torch.autograd.grad(out, x, column, retain_graph=True)[0] for column in mat]
    )
    assert lazy.shape == dense.shape
    for n0, n1 in _blocks(N):
        torch.testing.assert_close(
            lazy.columns(0, 4, samples=(n0, n1)),
            dense[:, n0:n1],
            rtol=1e-12,
            atol=1e-14,
        )


def test_relu_run_ahead_of_the_pool_scatter_keeps_samples():
    """``then`` moves the ReLU before max pooling's scatter: both narrow to samples."""
    modules, mat = _forward("cnn2d")
    lazy = _lazy(modules, mat)[4]  # flatten, pool, ReLU (run ahead), conv
    assert [op.scatter is not None for op in lazy.ops] == [False, False, True, False]
    assert all(op.samples is not None for op in lazy.ops)
    _assert_sample_blocks_match(lazy)


def test_sample_column_bytes_is_the_largest_column_per_sample():
    modules, mat = _forward("cnn2d")
    for lazy in _lazy(modules, mat):
        assert lazy.sample_column_bytes() * N == lazy.column_bytes()
    lazy = _lazy(modules, mat)[-1]
    # the first convolution's output (3 channels of 8 x 8), float64
    assert lazy.sample_column_bytes() == 3 * 8 * 8 * 8


def _no_samples(op: PendingOp) -> PendingOp:
    return PendingOp(op.fn, op.shape, op.fresh, op.narrow, op.scatter, op.at)


def test_a_map_without_samples_is_refused():
    modules, mat = _forward("cnn2d")
    lazy = _lazy(modules, mat)[2]
    assert LazyColumns(mat).sample_narrowable  # no maps
    blocked = LazyColumns(mat, (*lazy.ops[:-1], _no_samples(lazy.ops[-1])))
    assert not blocked.sample_narrowable
    with pytest.raises(NotImplementedError, match="cannot be restricted to samples"):
        blocked.columns(0, 1, samples=(0, 1))
    torch.testing.assert_close(blocked.columns(0, 2), lazy.columns(0, 2))


@pytest.mark.parametrize("samples", [(0, 0), (3, 2), (-1, 2), (0, N + 1)])
def test_a_bad_sample_range_is_refused(samples):
    modules, mat = _forward("cnn2d")
    lazy = _lazy(modules, mat)[3]
    with pytest.raises(ValueError, match=r"0 <= n0 < n1 <= N = 5"):
        lazy.columns(0, 1, samples=samples)


def _pass_net():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(3, 3),
    )  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{}, {"mc_samples": 2, "subsampling": [3, 0, 2]}],
    ids=["exact", "mc-subsampled"],
)
def test_every_lazy_factor_of_a_budgeted_pass_forms_sample_blocks(monkeypatch, options):
    created = []
    real_init = LazyColumns.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(LazyColumns, "__init__", recording)
    problem = make_problem(dict(model=_pass_net, loss=nn.CrossEntropyLoss,
                                x=(4, 2, 8, 8), y=lambda n: torch.randint(0, 3, (n,))))  # fmt: skip
    ggn = vivitlib.LowRankGGN(
        problem.params,
        max_memory=1,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    with cost_model(gram_plan="dense"):
        problem.run(ggn)
    monkeypatch.setattr(LazyColumns, "__init__", real_init)
    assert created and max(len(lazy.ops) for lazy in created) >= 3
    samples = len(options.get("subsampling", range(4)))
    assert {lazy.shape[1] for lazy in created} == {samples}
    if "mc_samples" in options:
        assert {lazy.shape[0] for lazy in created} == {options["mc_samples"]}
    for lazy in created:
        _assert_sample_blocks_match(lazy)
