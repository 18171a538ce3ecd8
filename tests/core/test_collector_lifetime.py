"""A collector dropped after a pass frees its results at once (no reference cycle
through its extensions), and extensions outliving their collector fail clearly."""

import gc
import weakref

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import vivitlib

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _setup():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    return model, extend(nn.CrossEntropyLoss()), X, y


def _one_step(make_collector):
    model, loss_fn, X, y = _setup()
    collector = make_collector(model)
    with backpack(*collector.extensions, extension_hook=collector.hook):
        loss_fn(model(X), y).backward()
    gram = collector.blocks[0].gram
    return weakref.ref(collector), weakref.ref(gram)


@pytest.mark.parametrize(
    "make_collector",
    [
        lambda m: vivitlib.LowRankGGN(m.parameters(), compute=vivitlib.QUANTITIES),
        lambda m: vivitlib.LowRankGGN(m.parameters(), mc_samples=1),
        lambda m: vivitlib.LowRankGGN(vivitlib.layerwise_groups(m), max_memory=1),
    ],
    ids=["exact-all", "mc", "layerwise-budget"],
)
def test_dropped_collector_is_freed_without_the_cycle_collector(make_collector):
    gc.collect()
    gc.disable()
    try:
        collector, gram = _one_step(make_collector)
        assert collector() is None and gram() is None
    finally:
        gc.enable()


def test_extensions_outliving_their_collector_fail_clearly():
    model, loss_fn, X, y = _setup()
    extensions = vivitlib.LowRankGGN(model.parameters()).extensions
    gc.collect()
    with pytest.raises(RuntimeError, match="was deleted before the backward pass"):
        with backpack(*extensions):
            loss_fn(model(X), y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_kept_collectors_work_across_collections_and_passes():
    """A collector the user keeps (alone, or combined with another) runs its
    passes with cycle collections in between, every pass's numbers intact."""
    model, loss_fn, X, y = _setup()
    ggn = vivitlib.LowRankGGN(model.parameters())
    directions = [torch.randn(2, *p.shape) for p in model.parameters()]
    dd = vivitlib.DirectionalDerivatives(list(model.parameters()), directions)
    joint = vivitlib.combine(ggn, dd)
    gc.collect()
    evals = []
    for _ in range(2):
        with backpack(*joint.extensions, extension_hook=joint.hook):
            loss_fn(model(X), y).backward()
        gc.collect()
        evals.append(ggn.blocks[0].evals.clone())
        assert dd.gammas.shape == (X.shape[0], 2)
    torch.testing.assert_close(evals[0], evals[1])
