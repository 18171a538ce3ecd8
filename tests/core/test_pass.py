"""The visible life cycle of a curvature pass (``collector.current_pass``)."""

import pytest
from backpack import backpack

import vivitlib
from vivitlib.errors import NoPassError, StalePassWarning


def _backward(problem, ggn=None):
    loss = problem.loss_fn(problem.model(problem.X), problem.y)
    if ggn is None:
        loss.backward()
        return
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        assert ggn.current_pass is None or ggn.current_pass.backward_done
        loss.backward()


def test_pass_flags_follow_the_life_cycle(problem):
    ggn = vivitlib.LowRankGGN(problem.params)
    assert ggn.current_pass is None
    with pytest.raises(NoPassError):
        ggn.blocks  # noqa: B018
    _backward(problem, ggn)
    current = ggn.current_pass
    assert current.backward_done and not current.finished and not current.stale
    ggn.blocks  # noqa: B018
    assert current.finished and ggn.current_pass is current
    _backward(problem)  # a later backward without the collector
    assert current.stale and ggn.is_stale
    _backward(problem, ggn)
    fresh = ggn.current_pass
    assert fresh is not current and fresh.backward_done and not fresh.stale
    _backward(problem)
    with pytest.warns(StalePassWarning):
        ggn.blocks  # noqa: B018 -- first read after a later backward
    assert fresh.finished and fresh.stale
    ggn.reset()
    assert ggn.current_pass is None


def test_zero_curvature_gives_an_empty_block():
    """A group whose GGN is zero: K = 0 and every quantity with a zero axis."""
    import torch
    from backpack import extend
    from torch import nn

    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double())
    nn.init.zeros_(model[2].weight)  # the first layer cannot change the output
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(5, 3).double(), torch.randint(0, 2, (5,))
    ggn = vivitlib.LowRankGGN(list(model[0].parameters()))
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(model(X), y).backward()
    block = ggn.blocks[0]
    assert block.num_directions == 0 and block.gram_evecs.shape == (10, 0)
    assert torch.count_nonzero(block.gram) == 0
    assert block.gammas.shape == (5, 0) and block.lambdas.shape == (5, 0)
    assert all(torch.count_nonzero(s) == 0 for s in block.newton_step(0.1))
