"""``subsampling=rule``: curvature samples chosen per pass from the batch size."""

import pytest
import torch
from backpack import backpack

import vivitlib
from tests.core.cases import CASES, make_problem
from tests.core.helpers import assert_block_matches_dense

CASE = next(c for c in CASES if c["id"] == "cnn-ce")


def _half(batch_size: int, outputs: int) -> list[int]:
    return list(range(batch_size - batch_size // 2, batch_size))  # the last half


def test_rule_gives_the_exact_ggn_of_the_chosen_samples():
    calls = []

    def rule(batch_size, outputs):
        calls.append((batch_size, outputs))
        return _half(batch_size, outputs)

    problem = make_problem(CASE)
    N = problem.X.shape[0]
    chosen = _half(N, 0)
    dense = problem.dense()
    curv = make_problem(CASE)  # same seed: same model and batch
    curv.X, curv.y = curv.X[chosen], curv.y[chosen]
    sub = curv.dense()
    ggn = vivitlib.LowRankGGN(problem.params, subsampling=rule)
    problem.run(ggn)
    with torch.no_grad():
        outputs = problem.model(problem.X)[0].numel()
    assert calls == [(N, outputs)]
    block = ggn.blocks[0]
    # eigenpairs and λ of the chosen samples; γ and g of the whole batch
    dense.ggn, dense.per_sample_ggn = sub.ggn, sub.per_sample_ggn
    # the sub-sampled GGN is scaled to the batch: mean over the chosen samples
    assert_block_matches_dense(block, dense)
    assert ggn.subsampling == chosen


def test_rule_is_asked_again_for_every_batch():
    problem = make_problem(CASE)
    ggn = vivitlib.LowRankGGN(problem.params, subsampling=_half)
    problem.run(ggn)
    first = ggn.blocks[0].num_curv_samples
    problem.X, problem.y = problem.X[:3], problem.y[:3]
    problem.run(ggn)
    assert (first, ggn.blocks[0].num_curv_samples) == (
        CASE["x"][0] // 2,
        1,
    )


def test_rule_returning_none_uses_every_sample():
    problem = make_problem(CASE)
    ggn = vivitlib.LowRankGGN(problem.params, subsampling=lambda n, c: None)
    problem.run(ggn)
    assert_block_matches_dense(ggn.blocks[0], problem.dense())


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        ([0, 0], ValueError, "subsampling \\(returned by the rule\\)"),
        ([99], ValueError, "subsampling"),
        ([0.5], TypeError, "subsampling \\(returned by the rule\\)"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_rule_output_is_a_clear_error_and_leaves_grad_alone(returned, error, match):
    problem = make_problem(CASE)
    for p in problem.params:
        p.grad = torch.ones_like(p)
    ggn = vivitlib.LowRankGGN(problem.params, subsampling=lambda n, c: returned)
    with pytest.raises(error, match=match):
        problem.run(ggn)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in problem.params)


def test_rule_with_process_group_is_refused():
    problem = make_problem(CASE)
    with pytest.raises(ValueError, match="sub-sampling rule needs the local batch"):
        vivitlib.LowRankGGN(problem.params, subsampling=_half, process_group=object())


def test_a_collector_with_a_rule_joins_a_combined_pass_with_its_own_extensions():
    problem = make_problem(CASE)
    ruled = vivitlib.LowRankGGN(problem.params, subsampling=lambda n, c: None)
    plain = vivitlib.LowRankGGN(problem.params)
    joint = vivitlib.combine(ruled, plain)
    with backpack(*joint.extensions, extension_hook=joint.hook):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
    dense = problem.dense()
    assert_block_matches_dense(ruled.blocks[0], dense)
    assert_block_matches_dense(plain.blocks[0], dense)
