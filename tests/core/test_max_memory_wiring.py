"""``max_memory=`` reaches every collector: directional derivatives, joint passes,
the Newton optimiser (issue 13)."""

import warnings

import pytest
import torch
from backpack import backpack

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense
from tests.core.test_max_memory import NETS
from tests.optim.helpers import make_closure
from vivitlib.memory import MemoryBudgetWarning
from vivitlib.optim import ConstantDamping, DampedNewton


def _quietly(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        return call()


def _derivatives(problem, directions, budget):
    dd = vivitlib.DirectionalDerivatives(problem.params, directions, max_memory=budget)
    _quietly(lambda: problem.run(dd))
    return dd.gammas, dd.lambdas


def test_directional_derivatives_match_dense_under_a_budget():
    problem = make_problem(NETS["pool-net"])
    torch.manual_seed(1)
    directions = [torch.randn(2, *p.shape, dtype=p.dtype) for p in problem.params]
    gammas, lambdas = _derivatives(problem, directions, budget=1)
    dense = problem.dense()
    D = torch.cat([d.flatten(1) for d in directions], 1)
    torch.testing.assert_close(gammas, dense.per_sample_grads @ D.T)
    expected = torch.einsum("kd,nde,ke->nk", D, dense.per_sample_ggn, D)
    torch.testing.assert_close(lambdas, expected)


def test_joint_pass_keeps_every_members_factors_under_the_tightest_budget():
    """Two collectors share the factor pass: a budgeted one for the last layer
    only and an unbudgeted one for all parameters. The shared pass must not stop
    below the last layer (it serves the union) and runs under the budget."""
    problem = make_problem(NETS["pool-net"])
    last = list(problem.model[-1].parameters())
    head = vivitlib.LowRankGGN(last, max_memory=1)
    full = vivitlib.LowRankGGN(problem.params)
    joint = vivitlib.combine(full, head)  # the leader has no budget
    with pytest.warns(MemoryBudgetWarning):
        with backpack(*joint.extensions, extension_hook=joint.hook):
            problem.loss_fn(problem.model(problem.X), problem.y).backward()
    assert_block_matches_dense(head.blocks[0], problem.dense(last))
    assert_block_matches_dense(full.blocks[0], problem.dense())


def _one_step(max_memory):
    problem = make_problem(NETS["pool-net"])
    opt = DampedNewton(problem.params, ConstantDamping(0.1), max_memory=max_memory)
    closure = make_closure(opt, problem.model, problem.loss_fn, problem.X, problem.y)
    _quietly(lambda: opt.step(closure))
    return torch.cat([p.detach().flatten() for p in problem.params])


def test_newton_step_unchanged_by_a_budget():
    torch.testing.assert_close(_one_step("1B"), _one_step(None), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), ("lots", ValueError), (2.5, TypeError)]
)
def test_newton_rejects_bad_budgets(value, error):
    problem = make_problem(NETS["pool-net"])
    with pytest.raises(error, match="max_memory"):
        DampedNewton(problem.params, max_memory=value)
    with pytest.raises(error, match="max_memory"):
        vivitlib.DirectionalDerivatives(
            problem.params, [p[None] for p in problem.params], max_memory=value
        )


@pytest.mark.parametrize("budget", [1, 3000, None])
def test_first_layer_only_under_a_budget_matches_dense(budget):
    """Convolutions above the grouped layer get lazy factors but no factors of
    their own (their inputs are not unfolded): the first layer's block is exact."""
    problem = make_problem(NETS["pool-net"])
    first = list(problem.model[0].parameters())
    ggn = vivitlib.LowRankGGN(first, max_memory=budget)
    _quietly(lambda: problem.run(ggn))
    assert_block_matches_dense(ggn.blocks[0], problem.dense(first))


@pytest.mark.parametrize(
    "compute, lifted",
    [(None, None), (("eigenvalues",), 1), (("newton_step",), 1),
     (("eigenvectors", "newton_step"), None)],
)  # fmt: skip
def test_newton_only_passes_announce_one_lifted_vector(compute, lifted):
    """Without eigenvectors, kept factors lift one vector: the cost model knows."""
    problem = make_problem(NETS["pool-net"])
    kwargs = {} if compute is None else {"compute": compute}
    ggn = vivitlib.LowRankGGN(problem.params, max_memory="1MiB", **kwargs)
    assert ggn._budget.lifted_vectors == lifted
    assert ggn._budget.total_bytes == 2**20
    if compute == ("newton_step",):  # the outer factors it keeps are exact
        dense = problem.dense()
        _quietly(lambda: problem.run(ggn))
        assert_block_matches_dense(ggn.blocks[0], dense)
