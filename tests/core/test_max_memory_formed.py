"""A formed factor reaching a convolution whose unfolded input exceeds the budget.

Under ``max_memory=`` the unfolded input of such a layer is given in blocks of
samples (:func:`vivitlib.extensions.layers.conv_input_blocks`) and the
weight's factor is one of the lazy factors' classes with the formed factor as
a lazy factor without pending maps: the numbers must equal the dense GGN's,
with no whole unfolded input formed for the Gram.
"""

import warnings

import pytest
import torch
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense, spy_unfolding
from tests.reference import eigh_desc
from vivitlib.factors import cost_model
from vivitlib.memory import MemoryBudgetWarning


def _net():
    """Last convolution before the loss: its factor arrives formed (small)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(),
        nn.Conv2d(4, 2, 3), nn.Flatten(),
    )  # fmt: skip


CASE = dict(
    model=_net, loss=nn.MSELoss, x=(5, 3, 5, 6), y=lambda n: torch.randn(n, 2 * 3 * 4)
)


def _run(problem, budget, **options):
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=budget, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        problem.run(ggn)
    return ggn.blocks[0]


@pytest.mark.parametrize("plan", ["dense", "pairwise"])
def test_blocked_input_of_a_formed_factor_matches_dense(monkeypatch, plan):
    problem = make_problem(CASE)
    formed = spy_unfolding(monkeypatch)
    # the factor at the last convolution (24 columns of 24 entries, float64)
    # is formed; its unfolded input (5 samples x 36 x 16) is not
    with cost_model(gram_plan=plan):
        block = _run(problem, 40000, compute="eigenvalues")
    evals = eigh_desc(problem.dense().ggn)[0]
    K = block.num_directions
    torch.testing.assert_close(block.evals, evals[:K], rtol=1e-8, atol=1e-12)
    assert (evals[K:].abs() <= 1e-8 * evals[0]).all()
    assert formed and max(formed) < 5


@pytest.mark.parametrize("plan", ["dense", "pairwise"])
def test_full_compute_with_blocked_inputs_matches_dense(plan):
    problem = make_problem(CASE)
    with cost_model(gram_plan=plan):
        block = _run(problem, 40000)
    assert_block_matches_dense(block, problem.dense())
