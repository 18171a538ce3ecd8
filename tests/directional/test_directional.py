"""Per-sample derivatives along arbitrary directions vs dense per-sample references."""

import pytest
import torch

import vivitlib
from tests.core.cases import CASES, make_problem
from tests.reference import per_sample_hessians

_BY_ID = {c["id"]: c for c in CASES}


def _random_directions(params, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(K, *p.shape, generator=gen, dtype=p.dtype) for p in params]


def _flat(directions):
    return torch.cat([d.flatten(1) for d in directions], dim=1)


@pytest.mark.parametrize(
    "case_id",
    [
        "mlp-ce-mean",
        "mlp-mse-sum",
        "cnn-ce",
        "seq-linear-mse",
        "ce-ignore-index-mean",
        "ce-sequence-ignored-positions",
        "ce-class-weights",
    ],
)
def test_random_directions(case_id):
    problem = make_problem(_BY_ID[case_id])
    directions = _random_directions(problem.params, K=4)
    dd = vivitlib.DirectionalDerivatives(problem.params, directions)
    problem.run(dd)
    dense = problem.dense()
    D = _flat(directions)
    gammas = dense.per_sample_grads @ D.T
    lambdas = torch.einsum("kd,nde,ke->nk", D, dense.per_sample_ggn, D)
    torch.testing.assert_close(dd.gammas, gammas, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dd.lambdas, lambdas, rtol=1e-8, atol=1e-10)


def test_subsampled_samples():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    directions = _random_directions(problem.params, K=3)
    dd = vivitlib.DirectionalDerivatives(problem.params, directions, subsampling=[4, 1],
                                         grad_subsampling=[0, 2, 5])  # fmt: skip
    problem.run(dd)
    dense = problem.dense()
    D = _flat(directions)
    torch.testing.assert_close(dd.gammas, dense.per_sample_grads[[0, 2, 5]] @ D.T)
    lambdas = torch.einsum("kd,nde,ke->nk", D, dense.per_sample_ggn[[4, 1]], D)
    torch.testing.assert_close(dd.lambdas, lambdas)


def test_exact_eigenvectors_reproduce_gram_results():
    problem = make_problem(_BY_ID["cnn-ce"])
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block = ggn.blocks[0]
    for p in problem.params:
        p.grad = None
    dd = vivitlib.DirectionalDerivatives(problem.params, block.evecs())
    problem.run(dd)
    torch.testing.assert_close(dd.lambdas.mean(0), block.evals, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(dd.lambdas, block.lambdas, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(dd.gammas, block.gammas, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("case_id", ["mlp-ce-mean", "mlp-mse-sum"])
def test_per_sample_hessian_curvatures(case_id):
    problem = make_problem(_BY_ID[case_id])
    directions = _random_directions(problem.params, K=2)
    curv = vivitlib.per_sample_hessian_curvatures(
        problem.model, problem.loss_fn, problem.X, problem.y, directions
    )
    H = per_sample_hessians(problem.model, problem.loss_fn, problem.X, problem.y)
    D = _flat(directions)
    expected = torch.einsum("kd,nde,ke->nk", D, H, D)
    torch.testing.assert_close(curv, expected, rtol=1e-8, atol=1e-10)
    # the mean over samples is the Hessian of the batch loss along d_k
    full = problem.dense()  # GGN differs from H in general; only check shapes there
    assert curv.shape == (problem.X.shape[0], 2) and full.ggn.shape[0] == D.shape[1]


def test_bad_directions():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    p = problem.params
    with pytest.raises(
        ValueError, match="one \\[K, \\*param.shape\\] tensor per parameter"
    ):
        vivitlib.DirectionalDerivatives(p, _random_directions(p, 2)[:-1])
    bad = _random_directions(p, 2)
    bad[0] = torch.zeros(2, 7)
    with pytest.raises(ValueError, match="does not fit"):
        vivitlib.DirectionalDerivatives(p, bad)
    mixed = _random_directions(p, 2)
    mixed[1] = torch.zeros(3, *p[1].shape)
    with pytest.raises(ValueError, match="disagree on K"):
        vivitlib.DirectionalDerivatives(p, mixed)
