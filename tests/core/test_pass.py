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
