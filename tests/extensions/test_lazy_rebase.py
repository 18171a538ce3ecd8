"""A channel-sliced convolution forms the maps behind a ``Jᵀ`` once (issue 13).

Without a budget, a lazy factor reaching a convolution that forms its output
factor a slice of channels at a time has the maps each slice would rerun whole
(up to the previous convolution's ``Jᵀ``) formed once
(:func:`vivitlib.extensions.lazy_layers.sliceable`); under a budget only where
that fits its ``lazy_bytes``. Same numbers either way: checked against the
dense float64 reference and the slice-by-slice route.
"""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense, flat_evecs
from tests.reference import eigh_desc
from vivitlib.extensions import conv_backprop, lazy_layers
from vivitlib.extensions.conv_backprop import FAST_CONV_DERIVATIVES
from vivitlib.extensions.fast_backprop import FAST_DERIVATIVES
from vivitlib.extensions.lazy import LazyColumns
from vivitlib.factors import cost_model
from vivitlib.memory import MemoryBudget, memory_budget

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore::vivitlib.memory.MemoryBudgetWarning"
)


def _chain_modules():
    """conv → ReLU → max pool → conv → ReLU → max pool (BackPACK order: reversed)."""
    torch.manual_seed(0)
    net = extend(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(3, 4, 2), nn.ReLU(), nn.MaxPool2d(2, padding=1),
    ).double())  # fmt: skip
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    with backpack():
        out = net(x)
    return list(net)[::-1], torch.randn(6, *out.shape, dtype=torch.float64)


def _lazy(modules, mat, depth):
    lazy = LazyColumns(mat)
    for module in modules[:depth]:
        table = (
            FAST_CONV_DERIVATIVES if isinstance(module, nn.Conv2d) else FAST_DERIVATIVES
        )
        lazy = lazy.then(table[type(module)]().column_op(module))
    return lazy


@pytest.mark.parametrize(("depth", "mixing"), [(2, 0), (3, 3), (5, 3)])
def test_rebased_factor_and_its_channels_equal_the_chain(depth, mixing):
    modules, mat = _chain_modules()
    lazy = _lazy(modules, mat, depth)
    assert lazy.mixing_ops() == mixing
    formed = lazy.materialise()
    rebased = lazy.rebased(lazy.mixing_ops())
    assert rebased.mixing_ops() == 0
    assert len(rebased.ops) == depth - mixing
    assert rebased.rebased_bytes(0) == rebased.source.numel() * 8
    torch.testing.assert_close(rebased.materialise(), formed, rtol=1e-13, atol=1e-15)
    channels = formed.shape[2]
    # whole columns at a time and one column at a time (chunks of narrowed maps)
    for budget in (MemoryBudget(), MemoryBudget(column_bytes=1)):
        with memory_budget(budget):
            for o0, o1 in [(0, 1), (1, channels), (0, channels)]:
                expected = formed[:, :, o0:o1]
                torch.testing.assert_close(lazy.channels(o0, o1), expected)
                torch.testing.assert_close(rebased.channels(o0, o1), expected)
    assert torch.equal(lazy.source, mat)  # the source is never overwritten


def test_channel_chunks_are_sized_by_the_narrowed_maps(monkeypatch):
    """A slice of one channel forms more columns at a time than whole columns."""
    modules, mat = _chain_modules()
    lazy = _lazy(modules, mat, 2)  # pool, ReLU: both narrow to their channels
    whole_column = lazy.column_bytes()
    sizes = []
    real = LazyColumns.chunks
    monkeypatch.setattr(
        LazyColumns, "chunks", lambda self, b=None: sizes.append(b) or real(self, b)
    )
    with memory_budget(MemoryBudget(column_bytes=whole_column)):
        lazy.channels(0, 1)
    assert sizes == [whole_column // lazy.shape[2]]


def _wide_conv_net():
    """3C3D in small: the second convolution's dense V outweighs its output factor,
    and its factor comes through the third's ``Jᵀ`` (pool, ReLU, ``Jᵀ``, pool, ReLU)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2, padding=1),
        nn.Conv2d(6, 5, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5, 3),
    )  # fmt: skip


def _problem():
    return make_problem(dict(model=_wide_conv_net, loss=nn.CrossEntropyLoss,
                             x=(4, 2, 10, 10), y=lambda n: torch.randint(0, 3, (n,))))  # fmt: skip


@pytest.fixture
def tiny_defaults(monkeypatch):
    """No budget, but every backpropagated factor above 1 byte stays lazy."""
    real = MemoryBudget.split.__func__

    def split(cls, total, lifted_vectors=None):
        if total is None:
            return cls(lazy_bytes=1, column_bytes=200, lifted_vectors=lifted_vectors)
        return real(cls, total, lifted_vectors=lifted_vectors)

    monkeypatch.setattr(MemoryBudget, "split", classmethod(split))


@pytest.fixture
def spies(monkeypatch):
    """Record the maps rebased per call and every narrowed convolution ``Jᵀ``."""
    seen = {"rebased": [], "narrowed": []}
    real_rebased = LazyColumns.rebased
    real_narrowed = conv_backprop._ConvSnapshot.narrowed
    monkeypatch.setattr(
        LazyColumns,
        "rebased",
        lambda self, ops: seen["rebased"].append(ops) or real_rebased(self, ops),
    )
    monkeypatch.setattr(
        conv_backprop._ConvSnapshot,
        "narrowed",
        lambda self, *a: seen["narrowed"].append(a) or real_narrowed(self, *a),
    )
    return seen


def _assert_matches_dense(block, dense, compute):
    if "eigenvectors" in compute:
        assert_block_matches_dense(block, dense)
        return
    evals = eigh_desc(dense.ggn)[0][: block.num_directions]
    torch.testing.assert_close(block.evals, evals, rtol=1e-6, atol=1e-10 * evals[0])


@pytest.mark.parametrize("compute", [("eigenvalues",), vivitlib.QUANTITIES])
def test_default_pass_forms_the_mixing_maps_once(tiny_defaults, spies, compute):
    problem = _problem()
    ggn = vivitlib.LowRankGGN(problem.params, compute=compute)
    with cost_model(gram_plan="dense"):
        problem.run(ggn)
    # the second convolution's slices: the third's Jᵀ and the maps before it once
    assert spies["rebased"] == [3]
    assert len(spies["narrowed"]) <= 1  # to find the mixing maps, never per slice
    _assert_matches_dense(ggn.blocks[0], problem.dense(), compute)


def test_budget_below_the_formed_maps_keeps_them_lazy(spies):
    problem = _problem()
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=1)
    with cost_model(gram_plan="dense"):
        problem.run(ggn)
    assert 3 not in spies["rebased"]
    assert spies["narrowed"]  # every slice goes through the third's Jᵀ
    assert_block_matches_dense(ggn.blocks[0], problem.dense())


def test_budget_fitting_the_formed_maps_forms_them(monkeypatch, spies):
    problem = _problem()
    real = lazy_layers.current_budget
    # a budget whose lazy_bytes fit the rebased source, nothing else formed
    monkeypatch.setattr(
        LazyColumns, "rebased_bytes", lambda self, ops: real().lazy_bytes
    )
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=4)
    with cost_model(gram_plan="dense"):
        problem.run(ggn)
    # under a budget the linear layer's Jᵀ stays lazy too (it narrows its
    # input, 5 -> 3): the third convolution forms it, the second then forms the
    # flatten, pool, ReLU and the third's Jᵀ once
    assert spies["rebased"] == [1, 4]
    assert_block_matches_dense(ggn.blocks[0], problem.dense())


def _results(**kwargs):
    problem = _problem()
    ggn = vivitlib.LowRankGGN(
        vivitlib.layerwise_groups(problem.model),
        generator=torch.Generator().manual_seed(3),
        mc_samples=2, subsampling=[3, 0, 2], grad_subsampling=[1, 2],
        **kwargs,
    )  # fmt: skip
    with cost_model(gram_plan="dense"):
        problem.run(ggn)
    return [(b.evals, b.gammas, b.lambdas, flat_evecs(b)) for b in ggn.blocks]


def test_monte_carlo_and_subsampling_unchanged_by_the_rebase(monkeypatch):
    reference = _results()
    real = MemoryBudget.split.__func__
    monkeypatch.setattr(
        MemoryBudget,
        "split",
        classmethod(
            lambda cls, t: (
                cls(lazy_bytes=1, column_bytes=200) if t is None else real(cls, t)
            )
        ),
    )
    calls = []
    real_rebased = LazyColumns.rebased
    monkeypatch.setattr(
        LazyColumns,
        "rebased",
        lambda self, ops: calls.append(ops) or real_rebased(self, ops),
    )
    rebased = _results()
    assert 3 in calls
    for ref, got in zip(reference, rebased):
        sign = torch.sign((ref[3] * got[3]).sum(1, keepdim=True))
        for a, b in zip(ref[:3], got[:3]):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[3] * sign, ref[3], rtol=1e-9, atol=1e-12)
