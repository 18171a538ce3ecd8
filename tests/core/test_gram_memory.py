"""The Gram matrix in one float64 buffer (issue 13), against dense references.

Linear weights' blocks ``⟨s_cn, s_dm⟩ ⟨a_n, a_m⟩`` (plus the bias's
``⟨s_cn, s_dm⟩``) are added row by row into the upper triangle and mirrored
once; with eigenvalues alone the matrix is decomposed in place and
``block.gram`` rebuilt from the triangle the solver keeps. References: ``V``
built explicitly (unit level) and ``2 J Jᵀ`` from ``torch.func`` for a summed
square loss, whose factor is ``√2 Jᵀ`` (end to end).
"""

import pytest
import torch
from backpack import backpack, extend
from torch import nn
from torch.func import functional_call, jacrev

import vivitlib
from tests.reference import plain_copy
from vivitlib.accumulator import GroupAccumulator
from vivitlib.factors import DenseFactor, KroneckerFactor
from vivitlib.linalg.gram import add_kronecker_gram_upper, mirror_upper_


def _random(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _kronecker_columns(s, a):
    """Explicit ``V`` ``[C·N, O·I]`` (class-major): column ``(c, n)`` is ``s_cn a_nᵀ``."""
    C, N, O = s.shape
    return torch.einsum("cno,ni->cnoi", s.double(), a.double()).reshape(C * N, -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("C", "N"), [(1, 5), (3, 4), (10, 33)])
def test_kronecker_gram_upper_and_mirror_equal_dense(C, N, dtype):
    s, a = _random(C, N, 6, dtype=dtype), _random(N, 7, dtype=dtype, seed=1)
    V_w, V_b = _kronecker_columns(s, a), s.double().reshape(C * N, -1)
    start = _random(C * N, C * N, seed=2)
    start = start + start.T  # an earlier part, symmetric
    total = start.clone().view(C, N, C, N)
    aa = a.double() @ a.double().T
    add_kronecker_gram_upper(total, s, aa + 1)  # weight and its bias at once
    mirror_upper_(total.view(C * N, C * N))
    expected = start + V_w @ V_w.T + V_b @ V_b.T
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(total.view(C * N, C * N), expected, rtol=tol, atol=tol)
    assert torch.equal(total.view(C * N, C * N), total.view(C * N, C * N).T)


def test_mirror_upper_copies_the_strict_upper_triangle():
    matrix = _random(150, 150)  # several strips of rows
    expected = matrix.triu() + matrix.triu(1).T
    assert torch.equal(mirror_upper_(matrix), expected)


def _weight_and_bias(C=3, N=4, O=5, I=6):  # noqa: E741
    s4, a3 = _random(C, N, 1, O), _random(N, 1, I, seed=1)
    return KroneckerFactor(s4, a3), DenseFactor(s4[:, :, 0]), s4, a3


def test_accumulator_adds_weight_and_bias_in_one_pass():
    weight, bias, s4, a3 = _weight_and_bias()
    params = [torch.zeros(5, 6), torch.zeros(5)]
    acc = GroupAccumulator(params, keep_factors=False)
    acc.add(params[0], weight, None)
    assert acc._pending is not None  # waits for a possible bias
    acc.add(params[1], bias, None)
    V = torch.cat(
        [_kronecker_columns(s4[:, :, 0], a3[:, 0]), s4[:, :, 0].reshape(12, -1)], 1
    )
    torch.testing.assert_close(
        acc.total_gram().view(12, 12), V @ V.T, rtol=1e-13, atol=1e-13
    )


def test_accumulator_adds_a_weight_without_bias_at_the_end():
    weight, _, s4, a3 = _weight_and_bias()
    other = DenseFactor(_random(3, 4, 9, seed=5))  # not the weight's bias
    params = [torch.zeros(5, 6), torch.zeros(9)]
    acc = GroupAccumulator(params, keep_factors=False)
    acc.add(params[0], weight, None)
    acc.add(params[1], other, None)
    V = torch.cat(
        [_kronecker_columns(s4[:, :, 0], a3[:, 0]), other.v.reshape(12, -1)], 1
    )
    torch.testing.assert_close(
        acc.total_gram().view(12, 12), V @ V.T, rtol=1e-13, atol=1e-13
    )


def test_a_complete_group_adds_its_last_weight_at_once():
    weight, _, _, _ = _weight_and_bias()
    params = [torch.zeros(5, 6)]
    acc = GroupAccumulator(params, keep_factors=False)
    acc.add(params[0], weight, None)
    assert acc._pending is None and acc.gram is not None  # s and a not kept


def test_a_factor_written_while_waiting_is_an_error():
    weight, _, s4, _ = _weight_and_bias()
    params = [torch.zeros(5, 6), torch.zeros(3)]  # the second never arrives
    acc = GroupAccumulator(params, keep_factors=False)
    acc.add(params[0], weight, None)
    s4.mul_(2)  # would silently change the waiting block
    with pytest.raises(RuntimeError, match="changed in place"):
        acc.total_gram()


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 6, bias=False),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).to(dtype)


def _reference_gram(model, X):
    """``2 J Jᵀ`` sample-major ``[N·C, N·C]`` in float64 (summed square loss)."""
    model = plain_copy(model).double()
    params = dict(model.named_parameters())
    jac = jacrev(lambda p: functional_call(model, p, (X.double(),)))(params)
    N, C = 0, 0
    flat = []
    for value in jac.values():
        N, C = value.shape[:2]
        flat.append(value.reshape(N * C, -1))
    J = torch.cat(flat, 1)
    return (2 * J @ J.T).detach()


def _square_loss_block(model, X, y, compute):
    """The one block of a pass with a summed square loss."""
    loss_fn = extend(nn.MSELoss(reduction="sum"))
    kwargs = {} if compute is None else {"compute": compute}
    ggn = vivitlib.LowRankGGN(model.parameters(), **kwargs)
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(model(X), y).backward()
    (block,) = ggn.blocks
    return block


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "compute", [("eigenvalues",), None], ids=["eigenvalues-in-place", "all"]
)
def test_block_gram_equals_dense_reference(dtype, compute):
    model = extend(_model(dtype))
    X, y = _random(6, 1, 4, 4, dtype=dtype), _random(6, 3, dtype=dtype, seed=1)
    block = _square_loss_block(model, X, y, compute)
    expected = _reference_gram(model, X)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = float(expected.abs().max())
    evals = torch.linalg.eigvalsh(expected).flip(0)[: block.num_directions]
    torch.testing.assert_close(block.evals, evals, rtol=tol, atol=tol * scale)
    # read after the decomposition: rebuilt from the kept triangle
    torch.testing.assert_close(block.gram, expected, rtol=tol, atol=tol * scale)
    assert torch.equal(block.gram, block.gram.T)


@pytest.mark.parametrize("compute", [("eigenvalues",), None], ids=["eigvals", "all"])
def test_a_single_linear_weight_is_added_when_the_block_is_made(compute):
    torch.manual_seed(0)
    model = extend(nn.Linear(4, 3, bias=False).double())  # nothing follows it
    X, y = _random(5, 4), _random(5, 3, seed=1)
    block = _square_loss_block(model, X, y, compute)
    expected = _reference_gram(model, X)
    torch.testing.assert_close(block.gram, expected, rtol=1e-12, atol=1e-12)
