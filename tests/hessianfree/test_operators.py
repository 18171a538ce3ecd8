"""Operators against dense float64 references computed with torch.func."""

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.hessianfree.cases import CASES, DENSE, make_problem
from vivitlib import hessianfree as hf

OPERATORS = {
    "hessian": hf.HessianOperator,
    "ggn": hf.GGNOperator,
    "ef": hf.EmpiricalFisherOperator,
}


@pytest.fixture(params=CASES, ids=[c["id"] for c in CASES])
def problem(request):
    return make_problem(request.param)


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("cache_graph", [None, True, False])
def test_products_match_dense(problem, kind, cache_graph):
    dense = DENSE[kind](problem)
    op = OPERATORS[kind](
        problem.model, problem.loss_fn, problem.batches, cache_graph=cache_graph
    )
    D = dense.shape[0]
    assert op.shape == (D, D)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(D, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V[:, 0], dense @ V[:, 0], rtol=1e-10, atol=1e-12)
    listed = op @ op.unflatten(V[:, 1])
    assert [t.shape for t in listed] == [p.shape for p in problem.params()]
    torch.testing.assert_close(
        op.flatten(listed), dense @ V[:, 1], rtol=1e-10, atol=1e-12
    )
    assert op.num_products == 5
    # second round reuses (or rebuilds) the graph and gives the same numbers
    torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", OPERATORS)
def test_single_batch_tuple_and_loader_agree(problem, kind):
    dense = DENSE[kind](problem)
    v = torch.linspace(-1, 1, dense.shape[0], dtype=torch.float64)
    single = OPERATORS[kind](problem.model, problem.loss_fn, (problem.X, problem.y))
    loader = DataLoader(TensorDataset(problem.X, problem.y), batch_size=3)
    looped = OPERATORS[kind](problem.model, problem.loss_fn, loader)
    torch.testing.assert_close(single @ v, dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(looped @ v, dense @ v, rtol=1e-10, atol=1e-12)


def test_float32_model_accumulates_in_float64():
    problem = make_problem(CASES[0])
    dense = DENSE["hessian"](problem)
    model32 = problem.model.float()
    batches = [(X.float(), y) for X, y in problem.batches]
    op = hf.HessianOperator(model32, problem.loss_fn, batches)
    v = torch.ones(dense.shape[0], dtype=torch.float64)
    out = op @ v
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dense @ v, rtol=1e-4, atol=1e-5)
    out32 = op @ v.float()
    assert out32.dtype == torch.float32


def test_param_subset_is_the_dense_sub_block():
    problem = make_problem(CASES[0])
    dense = DENSE["hessian"](problem)
    params = problem.params()
    sizes = [p.numel() for p in params]
    start = sum(sizes[:2])
    chosen = params[2:]
    op = hf.HessianOperator(
        problem.model, problem.loss_fn, problem.batches, params=chosen
    )
    block = dense[start:, start:]
    v = torch.randn(block.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, block @ v, rtol=1e-10, atol=1e-12)


def test_to_scipy_eigsh_matches_dense():
    problem = make_problem(CASES[1])
    dense = DENSE["ggn"](problem)
    op = hf.GGNOperator(problem.model, problem.loss_fn, problem.batches)
    linop = op.to_scipy()
    assert linop.dtype == np.float64
    x = np.arange(dense.shape[0], dtype=np.float64)
    np.testing.assert_allclose(linop @ x, dense.numpy() @ x, rtol=1e-10, atol=1e-12)
    vals = eigsh(
        linop, k=3, which="LA", return_eigenvectors=False, v0=np.ones(dense.shape[0])
    )
    exact = torch.linalg.eigvalsh(dense).numpy()[-3:]
    np.testing.assert_allclose(np.sort(vals), exact, rtol=1e-8, atol=1e-10)


def test_cache_rebuilt_after_inplace_parameter_update():
    problem = make_problem(CASES[0])
    op = hf.HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.y))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    op @ v
    with torch.no_grad():
        for p in problem.model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(
        op @ v, DENSE["hessian"](problem) @ v, rtol=1e-10, atol=1e-12
    )


def test_dropout_in_train_mode_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="dropout in train mode.*model.eval"):
        hf.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    model.eval()
    hf.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))


def test_batchnorm_in_train_mode_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="batch norm in train mode"):
        hf.GGNOperator(model, nn.CrossEntropyLoss(), (X, y))


def test_shuffling_loader_raises():
    problem = make_problem(CASES[0])
    loader = DataLoader(TensorDataset(problem.X, problem.y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        hf.HessianOperator(problem.model, problem.loss_fn, loader)


class _NoisyModel(nn.Module):
    """Functional dropout: invisible to the module scan, caught numerically."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(nn.functional.dropout(x, 0.5, training=True))


def test_nondeterministic_products_raise():
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    match = "not deterministic.*dropout.*batch norm.*shuffl"
    with pytest.raises(ValueError, match=match):
        hf.HessianOperator(_NoisyModel(), nn.CrossEntropyLoss(), (X, y))
    op = hf.HessianOperator(
        _NoisyModel(), nn.CrossEntropyLoss(), (X, y), check_deterministic=False
    )
    assert op.shape == (8, 8)


def test_bad_inputs():
    problem = make_problem(CASES[0])
    m, lf, data = problem.model, problem.loss_fn, problem.batches
    with pytest.raises(TypeError, match="nn.Module"):
        hf.HessianOperator(lambda x: x, lf, data)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        hf.HessianOperator(m, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(TypeError, match="one-shot iterator"):
        hf.HessianOperator(m, lf, iter(data))
    with pytest.raises(ValueError, match="not a model parameter"):
        hf.HessianOperator(m, lf, data, params=[torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="No parameters"):
        hf.HessianOperator(m, lf, data, params=[])
    op = hf.HessianOperator(m, lf, data)
    with pytest.raises(ValueError, match="shape"):
        op @ torch.zeros(3)
    with pytest.raises(ValueError, match="shaped like each parameter"):
        op @ [torch.zeros(2)]
    with pytest.raises(TypeError, match="tensor"):
        op @ np.zeros(op.shape[0])
    with pytest.raises(ValueError, match="no samples"):
        hf.HessianOperator(m, lf, [(problem.X[:0], problem.y[:0])])
