"""Approximations deliver what they promise: sub-sampling, groups, Monte-Carlo."""

import pytest
import torch
from backpack import backpack

import vivitlib
from tests.core.cases import CASES, make_problem
from tests.core.helpers import assert_eigenpairs, flat_evecs

_BY_ID = {c["id"]: c for c in CASES}
_SUBSAMPLE_CASES = ["mlp-ce-mean", "mlp-ce-sum", "mlp-mse-mean", "cnn-ce"]


@pytest.mark.parametrize("case_id", _SUBSAMPLE_CASES)
def test_subsampling_is_ggn_of_subset(case_id):
    problem = make_problem(_BY_ID[case_id])
    subset = [3, 0, 2]
    ggn = vivitlib.LowRankGGN(problem.params, subsampling=subset)
    problem.run(ggn)
    dense = problem.dense()
    # mean over the subset of the per-sample GGNs (scaled to the batch's reduction)
    expected = dense.batch_scale * dense.per_sample_ggn[subset].mean(0)
    block = ggn.blocks[0]
    assert_eigenpairs(block, expected)
    assert block.num_directions <= len(subset) * problem.model(problem.X).shape[1]
    E = flat_evecs(block)
    lambdas = torch.einsum("kd,nde,ke->nk", E, dense.per_sample_ggn[subset], E)
    torch.testing.assert_close(block.lambdas, lambdas, rtol=1e-7, atol=1e-10)


def test_grad_subsampling_uses_chosen_samples():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(
        problem.params, subsampling=[0, 1], grad_subsampling=[5, 2, 4]
    )
    problem.run(ggn)
    block = ggn.blocks[0]
    dense = problem.dense()
    E = flat_evecs(block)
    expected = dense.per_sample_grads[[5, 2, 4]] @ E.T
    torch.testing.assert_close(block.gammas, expected, rtol=1e-7, atol=1e-10)
    assert block.gammas.shape == (3, block.num_directions)
    assert block.lambdas.shape == (2, block.num_directions)
    g_sub = dense.batch_scale * dense.per_sample_grads[[5, 2, 4]].mean(0)
    torch.testing.assert_close(
        block.grad_norm_sq, g_sub.pow(2).sum(), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("case_id", ["mlp-ce-mean", "cnn-ce", "resnet-converter-ce"])
def test_layerwise_groups_are_diagonal_blocks(case_id):
    problem = make_problem(_BY_ID[case_id])
    groups = vivitlib.layerwise_groups(problem.model)
    ggn = vivitlib.LowRankGGN(groups)
    problem.run(ggn)
    assert len(ggn.blocks) == len(groups)
    dense = problem.dense()
    sizes = [p.numel() for p in problem.params]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    index = {id(p): i for i, p in enumerate(problem.params)}
    for group, block in zip(groups, ggn.blocks):
        rows = torch.cat([
            torch.arange(offsets[index[id(p)]], offsets[index[id(p)] + 1])
            for p in group["params"]
        ])  # fmt: skip
        assert_eigenpairs(block, dense.ggn[rows][:, rows])
        step = torch.cat([s.flatten() for s in block.newton_step(0.5)])
        evals, evecs = torch.linalg.eigh(dense.ggn[rows][:, rows])
        keep = evals > 1e-9 * evals.max()
        U, lam = evecs[:, keep], evals[keep]
        expected = -U @ ((U.T @ dense.grad[rows]) / (lam + 0.5))
        torch.testing.assert_close(step, expected, rtol=1e-6, atol=1e-10)


def test_custom_groups_keep_order_and_split():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    p = problem.params
    ggn = vivitlib.LowRankGGN([{"params": [p[3], p[0]]}, {"params": [p[1], p[2]]}])
    problem.run(ggn)
    shapes = [e.shape[1:] for e in ggn.blocks[0].evecs(2)]
    assert shapes == [p[3].shape, p[0].shape]


def _mc_ggn(problem, mc_samples):
    ggn = vivitlib.LowRankGGN(
        problem.params, mc_samples=mc_samples, compute=["eigenvectors"]
    )
    problem.run(ggn)
    block = ggn.blocks[0]
    E = flat_evecs(block)
    return E.T @ (block.evals[:, None] * E)


def test_monte_carlo_factor_is_unbiased():
    """Average of MC GGNs over seeds approaches the exact GGN (seeded, fast)."""
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    exact = problem.dense().ggn
    torch.manual_seed(1)
    reps, m = 60, 20
    avg = sum(_mc_ggn(problem, m) for _ in range(reps)) / reps
    rel = (avg - exact).norm() / exact.norm()
    # 1200 samples in total: relative Frobenius error ~ 1/sqrt(1200) ≈ 3 %
    assert rel < 0.08, rel
    single = _mc_ggn(problem, 1)
    assert (single - exact).norm() / exact.norm() > rel  # one sample is noisier


@pytest.mark.slow
def test_monte_carlo_converges_long():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    exact = problem.dense().ggn
    torch.manual_seed(2)
    avg = sum(_mc_ggn(problem, 100) for _ in range(200)) / 200
    assert (avg - exact).norm() / exact.norm() < 0.01


def test_monte_carlo_columns_and_rank():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params, mc_samples=2)
    problem.run(ggn)
    block = ggn.blocks[0]
    N = problem.X.shape[0]
    assert block.gram.shape == (2 * N, 2 * N)
    assert block.num_directions <= 2 * N
    torch.testing.assert_close(block.lambda_means, block.evals, rtol=1e-9, atol=0)


def test_eigenvalues_only_keeps_no_factor():
    problem = make_problem(_BY_ID["cnn-ce"])
    ggn = vivitlib.LowRankGGN(problem.params, compute=("eigenvalues",))
    assert len(ggn.extensions) == 1
    problem.run(ggn)
    block = ggn.blocks[0]
    assert block.num_directions > 0
    with pytest.raises(RuntimeError, match="compute="):
        block.evecs()
    with pytest.raises(RuntimeError, match="compute="):
        block.gammas  # noqa: B018
    with pytest.raises(RuntimeError, match="compute="):
        block.lambdas  # noqa: B018
    assert block.gram_evecs is None
    full = vivitlib.LowRankGGN(problem.params)
    problem.run(full)
    torch.testing.assert_close(block.evals, full.blocks[0].evals, rtol=1e-10, atol=0)


def test_float32_model_and_eigh_option():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    problem.model.float()
    problem.X = problem.X.float()
    ref = problem.dense().ggn.double()
    for eigh_dtype in (torch.float64, torch.float32):
        ggn = vivitlib.LowRankGGN(problem.params, eigh_dtype=eigh_dtype)
        problem.run(ggn)
        block = ggn.blocks[0]
        assert block.evals.dtype == eigh_dtype
        evals = torch.linalg.eigvalsh(ref).flip(0)[: block.num_directions]
        torch.testing.assert_close(block.evals.double(), evals, rtol=1e-4, atol=1e-6)
        assert block.evecs(2)[0].dtype == torch.float32


def test_two_collectors_share_one_pass():
    from backpack import backpack

    problem = make_problem(_BY_ID["cnn-ce"])
    alone = vivitlib.LowRankGGN(problem.params)
    problem.run(alone)
    alone_block = alone.blocks[0]  # read before the next pass makes it stale
    for p in problem.params:
        p.grad = None
    ggn = vivitlib.LowRankGGN(problem.params)
    sub = vivitlib.LowRankGGN(
        vivitlib.layerwise_groups(problem.model), subsampling=[1, 2]
    )
    joint = vivitlib.combine(ggn, sub)
    with backpack(*joint.extensions, extension_hook=joint.hook):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
    assert alone.is_stale
    torch.testing.assert_close(ggn.blocks[0].evals, alone_block.evals)
    torch.testing.assert_close(ggn.blocks[0].gammas, alone_block.gammas)
    dense = problem.dense()
    first = problem.params[:2]
    size = sum(p.numel() for p in first)
    expected = dense.batch_scale * dense.per_sample_ggn[[1, 2]].mean(0)
    expected = expected[:size, :size]
    evals = torch.linalg.eigvalsh(expected).flip(0)[: sub.blocks[0].num_directions]
    torch.testing.assert_close(sub.blocks[0].evals, evals, rtol=1e-7, atol=1e-12)
    assert not [k for p in problem.params for k in vars(p) if k.startswith("_vivitlib")]


def test_combine_backpropagates_each_factor_once():
    problem = make_problem(_BY_ID["cnn-ce"])
    params = problem.params
    torch.manual_seed(0)
    directions = [torch.randn(2, *p.shape, dtype=torch.float64) for p in params]

    def results(collectors):
        first, layerwise, directional = collectors[:3]
        return (
            first.blocks[0].evals,
            [b.evals for b in layerwise.blocks],
            directional.lambdas,
            directional.gammas,
        )

    expected = []
    for make in (
        lambda: vivitlib.LowRankGGN(params),
        lambda: vivitlib.LowRankGGN(vivitlib.layerwise_groups(problem.model)),
        lambda: vivitlib.DirectionalDerivatives(params, directions),
    ):
        collector = make()
        problem.run(collector)
        expected.append(collector)  # read right away, before the next pass
        expected[-1] = (
            collector.blocks
            if isinstance(collector, vivitlib.LowRankGGN)
            else (collector.lambdas, collector.gammas)
        )
    expected = (
        expected[0][0].evals,
        [b.evals for b in expected[1]],
        expected[2][0],
        expected[2][1],
    )
    together = [
        vivitlib.LowRankGGN(params),
        vivitlib.LowRankGGN(vivitlib.layerwise_groups(problem.model)),
        vivitlib.DirectionalDerivatives(params, directions),
        vivitlib.LowRankGGN(params, compute=("eigenvalues",), subsampling=[0, 2]),
    ]
    joint = vivitlib.combine(*together)
    # one exact factor for the first three, one for the sub-sample, one gradient
    assert len(joint.extensions) == 3
    with backpack(*joint.extensions, extension_hook=joint.hook):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
    got = results(together)
    torch.testing.assert_close(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got[2], expected[2])
    torch.testing.assert_close(got[3], expected[3])
    dense = problem.dense()
    sub = dense.batch_scale * dense.per_sample_ggn[[0, 2]].mean(0)
    evals = torch.linalg.eigvalsh(sub).flip(0)[: together[3].blocks[0].num_directions]
    torch.testing.assert_close(
        together[3].blocks[0].evals, evals, rtol=1e-7, atol=1e-12
    )
    assert not [k for p in params for k in vars(p) if k.startswith("_vivitlib")]


def test_combine_rolls_back_every_member_on_failure():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    members = [vivitlib.LowRankGGN(problem.params), vivitlib.LowRankGGN(problem.params)]
    joint = vivitlib.combine(*members)
    for p in problem.params:
        p.grad = torch.full_like(p, 0.5)
    with pytest.raises(ValueError, match="last operation"):
        with backpack(*joint.extensions, extension_hook=joint.hook):
            (2 * problem.loss_fn(problem.model(problem.X), problem.y)).backward()
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in problem.params)
    for member in members:
        with pytest.raises(RuntimeError, match="No curvature"):
            member.blocks  # noqa: B018
