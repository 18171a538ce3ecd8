"""Cross-entropy factors with C - 1 columns per sample (the softmax null vector).

The exact cross-entropy square root ``S_n`` annihilates ``√p_n``; the library
backpropagates ``S_n B_n`` (``C - 1`` columns) and maps Gram-space results back
to BackPACK's ``C`` columns. References: dense ``torch.func`` float64.
"""

import copy

import pytest
import torch
from backpack import backpack, extend
from torch import nn
from torch.func import functional_call, jacrev

import vivitlib
from tests.core.cases import CASES, make_problem
from tests.core.helpers import assert_block_matches_dense
from tests.reference import plain_copy
from vivitlib.extensions.losses import cross_entropy_column_basis

_BY_ID = {c["id"]: c for c in CASES}


def _loss_after_forward(logits: torch.Tensor) -> nn.Module:
    loss = extend(nn.CrossEntropyLoss())
    loss.input0 = logits  # what BackPACK stores at the forward pass
    return loss


@pytest.mark.parametrize("C", [2, 3, 10])
@pytest.mark.parametrize("scale", [0.1, 1.0, 60.0])
def test_basis_is_orthonormal_and_orthogonal_to_the_null_vector(C, scale):
    torch.manual_seed(C)
    logits = scale * torch.randn(7, C, dtype=torch.float64)
    logits[0, -1] = 80.0 * scale  # a confident prediction of the last class
    basis = cross_entropy_column_basis(_loss_after_forward(logits))
    assert basis.shape == (7, C, C - 1) and basis.dtype == torch.float64
    eye = torch.eye(C - 1, dtype=torch.float64).expand(7, -1, -1)
    torch.testing.assert_close(basis.mT @ basis, eye, atol=1e-14, rtol=0)
    root = torch.softmax(logits, 1).sqrt()
    null = torch.einsum("ncj,nc->nj", basis, root)
    torch.testing.assert_close(null, torch.zeros_like(null), atol=1e-14, rtol=0)
    sub = cross_entropy_column_basis(_loss_after_forward(logits), [4, 1])
    torch.testing.assert_close(sub, basis[[4, 1]])


def test_no_basis_where_the_columns_stay():
    logits = torch.randn(3, 4)
    assert cross_entropy_column_basis(extend(nn.MSELoss())) is None
    sequence = _loss_after_forward(torch.randn(3, 4, 5))  # positions share columns
    assert cross_entropy_column_basis(sequence) is None
    assert cross_entropy_column_basis(_loss_after_forward(logits[:, :1])) is None


def _public_gram_reference(problem) -> torch.Tensor:
    """``ṼᵀṼ`` with BackPACK's ``C`` columns ``J_nᵀ S_n e_c / √N`` ('mean')."""
    model = plain_copy(problem.model)
    params = dict(model.named_parameters())
    names = list(params)

    def out(*flat):
        return functional_call(model, dict(zip(names, flat)), (problem.X,))

    jacs = jacrev(out, argnums=tuple(range(len(names))))(*params.values())
    N, C = problem.X.shape[0], jacs[0].shape[1]
    J = torch.cat([j.reshape(N, C, -1) for j in jacs], 2)  # [N, C, D]
    with torch.no_grad():
        p = torch.softmax(out(*params.values()), 1)
    root = p.sqrt()
    S = torch.diag_embed(root) - p[:, :, None] * root[:, None, :]  # S_n[o, c]
    V = torch.einsum("nod,noc->dnc", J, S).reshape(J.shape[2], N * C) / N**0.5
    return V.T @ V


@pytest.mark.parametrize("case_id", ["mlp-ce-mean", "cnn-ce"])
def test_deflated_pass_gives_the_public_gram(case_id):
    problem = make_problem(_BY_ID[case_id])
    expected, dense = _public_gram_reference(problem), problem.dense()
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block = ggn.blocks[0]
    C = problem.model(problem.X).shape[1]
    assert block._num_columns == C - 1  # what was backpropagated
    assert block.gram.shape == expected.shape
    torch.testing.assert_close(block.gram, expected, atol=1e-12, rtol=1e-10)
    E = block.gram_evecs
    assert E.shape == (expected.shape[0], block.num_directions)
    K = block.num_directions
    torch.testing.assert_close(E.T @ E, torch.eye(K, dtype=E.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        expected @ E, E * block.evals, atol=1e-10 * block.evals[0], rtol=0
    )
    assert_block_matches_dense(block, dense)


@pytest.mark.parametrize("num_classes", [2, 6])
def test_confident_predictions_and_two_classes(num_classes):
    """Near one-hot softmax (the null vector ≈ a basis vector) and C = 2."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, num_classes))
    model = extend(model.double())
    with torch.no_grad():
        model[2].weight.mul_(12.0)  # logits spread by ~20: p_max ≈ 1 - 1e-8
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, num_classes, (6,))
    problem = type(make_problem(_BY_ID["mlp-ce-mean"]))(
        model, extend(nn.CrossEntropyLoss()), X, y
    )
    expected, dense = _public_gram_reference(problem), problem.dense()
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block = ggn.blocks[0]
    assert block._num_columns == num_classes - 1
    assert_block_matches_dense(block, dense)
    torch.testing.assert_close(
        block.gram,
        expected,
        atol=1e-12 * block.evals[0],
        rtol=1e-9,
    )


@pytest.mark.parametrize(
    "case_id, kwargs",
    [("mlp-ce-mean", dict(mc_samples=2)), ("mlp-mse-sum", {}),
     ("ce-sequence-output", {})],
)  # fmt: skip
def test_columns_kept_where_no_null_vector_is_known(case_id, kwargs):
    problem = make_problem(_BY_ID[case_id])
    ggn = vivitlib.LowRankGGN(problem.params, **kwargs)
    problem.run(ggn)
    block = ggn.blocks[0]
    # BackPACK's columns: MC samples, or one per output entry of a sample
    expected = kwargs.get("mc_samples") or problem.model(problem.X)[0].numel()
    assert block._num_columns == expected
    assert block._column_basis is None


def test_subsampled_deflated_pass_matches_the_subset():
    """Sub-sampling with ignored targets: the basis follows the kept samples."""
    problem = make_problem(_BY_ID["ce-ignore-index-mean"])
    ggn = vivitlib.LowRankGGN(problem.params, subsampling=[5, 1, 2, 4])
    problem.run(ggn)
    block = ggn.blocks[0]
    assert block._num_columns == 2
    # samples 1 and 4 are ignored by the loss: sample 5 and 2 remain
    assert block.gram.shape == (6, 6) and block.gram_evecs.shape[0] == 6
    E = block.gram_evecs
    torch.testing.assert_close(
        block.gram @ E, E * block.evals, atol=1e-10 * block.evals[0], rtol=0
    )


def test_joint_pass_with_directional_derivatives():
    """A shared deflated factor gives both collectors their exact numbers."""
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    torch.manual_seed(3)
    directions = [torch.randn(2, *p.shape, dtype=torch.float64) for p in problem.params]
    dd = vivitlib.DirectionalDerivatives(problem.params, directions)
    joint = vivitlib.combine(ggn, dd)
    with backpack(*joint.extensions, extension_hook=joint.hook):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
    dense = problem.dense()
    assert_block_matches_dense(ggn.blocks[0], dense)
    D = torch.cat([d.flatten(1) for d in directions], 1)
    lambdas = torch.einsum("kd,nde,ke->nk", D, dense.per_sample_ggn, D)
    torch.testing.assert_close(dd.lambdas, lambdas, rtol=1e-9, atol=1e-12)


def test_float32_factor_keeps_its_accuracy():
    """Confident float32 predictions: the C - 1 columns must not mix columns of
    very different size (the reflection onto the most probable class)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(8.0)  # logits spread: many tiny probabilities
    X, y = torch.randn(32, 20), torch.randint(0, 10, (32,))
    blocks = {}
    for dtype in (torch.float32, torch.float64):
        net = extend(copy.deepcopy(model).to(dtype))
        ggn = vivitlib.LowRankGGN(net.parameters(), compute=("eigenvalues",))
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            extend(nn.CrossEntropyLoss())(net(X.to(dtype)), y).backward()
        blocks[dtype] = ggn.blocks[0]
    assert blocks[torch.float32]._num_columns == 9
    got, ref = blocks[torch.float32].evals, blocks[torch.float64].evals
    K = min(got.numel(), ref.numel())
    assert K > 250  # the tail down to ~1e-6·λ_max is resolved
    rel = ((got[:K] - ref[:K]).abs() / ref[:K]).max()
    assert rel < 5e-5, float(rel)  # reflecting onto the last class: 3.5e-4
