"""Issue 10, neighbours: bad data, arguments and losses give a clear error or
the right number (dense float64 torch.func reference), never a quiet wrong one.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from tests.hessianfree.cases import CASES, DENSE, Problem, make_problem
from tests.hessianfree.test_guards import _state, _with_grads, assert_untouched
from vivitlib import hessianfree as hf

_DIAG = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))  # 8 x 8


def _problem() -> Problem:
    return make_problem(CASES[0])  # CE mean, 13 samples in batches 5, 5, 3


def _nan_x(p):
    X = p.X.clone()
    X[4, 1] = float("nan")
    return p.model, p.loss_fn, list(zip(X.split(5), p.y.split(5)))


def _inf_y():
    p = make_problem(CASES[2])  # MSE: floating targets
    y = p.y.clone()
    y[0, 0] = float("inf")
    return p.model, p.loss_fn, (p.X, y)


def _x_dtype(p):
    return p.model, p.loss_fn, (p.X.float(), p.y)


def _sizes_disagree(p):
    return p.model, p.loss_fn, [(p.X[:5], p.y[:4])]


def _empty_loader(p):
    empty = TensorDataset(p.X[:0], p.y[:0])
    return p.model, p.loss_fn, DataLoader(empty, batch_size=4)


def _all_ignored(p):
    return p.model, nn.CrossEntropyLoss(ignore_index=1), (p.X[:2], torch.ones(2).long())


def _vector_loss(p):
    return p.model, lambda out, y: (out**2).sum(1), (p.X, p.y)


def _tuple_output(p):
    class Pair(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x), x

    return Pair(p.model), lambda out, y: p.loss_fn(out[0], y), (p.X, p.y)


def _triples(p):
    return p.model, p.loss_fn, [(p.X, p.y, torch.arange(13))]


def _random_batch_sampler(p):
    sampler = BatchSampler(RandomSampler(range(13)), batch_size=4, drop_last=False)
    return (
        p.model,
        p.loss_fn,
        DataLoader(TensorDataset(p.X, p.y), batch_sampler=sampler),
    )


def _frozen_params(p):
    for q in p.model.parameters():
        q.requires_grad_(False)
    return p.model, p.loss_fn, (p.X, p.y)


BUILD_ERRORS = [
    ("nan-in-X", _nan_x, {}, ValueError, "Batch 0's inputs X contains NaN.*Remove"),
    ("inf-in-y", lambda p: _inf_y(), {}, ValueError, "targets y contains NaN or Inf"),
    ("X-dtype", _x_dtype, {}, TypeError, "float32 but the parameters are.*float64"),
    ("X-y-sizes", _sizes_disagree, {}, ValueError, "X holds 5 samples but y holds 4"),
    ("empty-loader", _empty_loader, {}, ValueError, "no samples.*non-empty"),
    ("empty-list", lambda p: (p.model, p.loss_fn, []), {}, ValueError, "no samples"),
    ("all-ignored", _all_ignored, {}, ValueError, "every target equals.*ignore_index"),
    ("vector-loss", _vector_loss, {"reduction": "sum"}, ValueError, "not a scalar"),
    ("tuple-output", _tuple_output, {"reduction": "mean"}, TypeError, "one floating"),
    ("frozen", _frozen_params, {}, ValueError, "No parameters.*frozen"),
    ("triples", _triples, {}, TypeError, "Batch 0 is a tuple of 3 items, not an"),
    ("batch-sampler", _random_batch_sampler, {}, ValueError, "shuffle=False"),
    (
        "reduction-conflict",
        lambda p: (p.model, p.loss_fn, p.batches),
        {"reduction": "sum"},
        ValueError,
        "reduction='sum' contradicts loss_fn.reduction='mean'",
    ),
    (
        "timeout<0",
        lambda p: (p.model, p.loss_fn, p.batches),
        {"timeout": -1},
        ValueError,
        "timeout must be",
    ),
    (
        "timeout-str",
        lambda p: (p.model, p.loss_fn, p.batches),
        {"timeout": "1"},
        TypeError,
        "timeout must be",
    ),
]


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [row[1:] for row in BUILD_ERRORS],
    ids=[row[0] for row in BUILD_ERRORS],
)
@pytest.mark.parametrize("cls", [hf.GGNOperator, hf.EmpiricalFisherOperator])
def test_bad_data_and_losses_raise_at_build(cls, make, kwargs, error, match):
    if cls is hf.EmpiricalFisherOperator and make in (_all_ignored, _vector_loss):
        pytest.skip("refused earlier (ignore_index) / per-sample losses are scalars")
    problem = _problem()
    model, loss_fn, data = make(problem)
    _with_grads(problem)
    before = _state(problem.model)
    with pytest.raises(error, match=match):
        cls(model, loss_fn, data, **kwargs)
    assert_untouched(problem.model, before)


ARGUMENT_ERRORS = [
    ("k=0", lambda A: hf.topk_eigh(A, 0), ValueError, "k must be at least 1"),
    (
        "k=0-power",
        lambda A: hf.power_iteration(A, 0),
        ValueError,
        "k must be at least 1",
    ),
    ("k=2.0", lambda A: hf.topk_eigh(A, 2.0), TypeError, "k must be an int.*k=1"),
    ("k=True", lambda A: hf.power_iteration(A, True), TypeError, "k must be an int"),
    ("iters=0", lambda A: hf.lanczos(A, 0), ValueError, "num_iters must be at least 1"),
    ("iters=-3", lambda A: hf.lanczos(A, -3), ValueError, "num_iters must be at least"),
    (
        "max_iters=0",
        lambda A: hf.power_iteration(A, max_iters=0),
        ValueError,
        "max_iters",
    ),
    ("probes=0", lambda A: hf.hutchinson_trace(A, 0), ValueError, "num_probes must be"),
    (
        "probes=-1",
        lambda A: hf.spectral_density(A, 3, -1),
        ValueError,
        "num_probes must",
    ),
    (
        "probes=2.5",
        lambda A: hf.hutchinson_trace(A, 2.5),
        TypeError,
        "num_probes must be an int",
    ),
    ("size=0", lambda A: hf.sketch(A, 0), ValueError, "size must be at least 1"),
    (
        "tol=nan",
        lambda A: hf.topk_eigh(A, 1, tol=float("nan")),
        ValueError,
        "tol must be a finite",
    ),
    (
        "tol=inf",
        lambda A: hf.power_iteration(A, tol=float("inf")),
        ValueError,
        "tol must be a finite",
    ),
    (
        "kernel=inf",
        lambda A: hf.spectral_density(A, 3, 2, kernel_var=float("inf")),
        ValueError,
        "kernel_var",
    ),
    (
        "log_eps<0",
        lambda A: hf.spectral_density(A, 3, 2, log=True, log_eps=-1.0),
        ValueError,
        "log_eps must be",
    ),
    (
        "deflation=0",
        lambda A: hf.hutchinson_trace(A, 9, num_deflation=0),
        ValueError,
        "num_deflation must be at least 1",
    ),
    (
        "generator",
        lambda A: hf.sketch(A, 2, generator=np.random.default_rng(0)),
        TypeError,
        "torch.Generator",
    ),
    ("v0=0", lambda A: hf.topk_eigh(A, 1, v0=torch.zeros(8)), ValueError, "v0 is zero"),
    (
        "v0-shape",
        lambda A: hf.lanczos(A, 2, v0=torch.ones(3)),
        ValueError,
        r"v0 must be a tensor of shape \[8\]",
    ),
    (
        "which",
        lambda A: hf.topk_eigh(A, 1, which="top"),
        ValueError,
        "which must be one of",
    ),
    (
        "asymmetric",
        lambda A: hf.topk_eigh(A + torch.triu(torch.ones_like(A), 1), 1),
        ValueError,
        "not symmetric.*A.T",
    ),
    (
        "asym-numpy",
        lambda A: hf.lanczos(np.triu(np.ones((8, 8))), 2),
        ValueError,
        "not symmetric",
    ),
    (
        "sigma=0",
        lambda A: hf.smooth(torch.zeros(2), torch.ones(2), torch.zeros(3), 0.0),
        ValueError,
        "sigma must be a finite positive",
    ),
    (
        "resmooth",
        lambda A: hf.spectral_density(A, 3, 2, deflate=0).smooth(kernel_var=-1.0),
        ValueError,
        "kernel_var must be",
    ),
]


@pytest.mark.parametrize(
    "call, error, match",
    [row[1:] for row in ARGUMENT_ERRORS],
    ids=[row[0] for row in ARGUMENT_ERRORS],
)
def test_bad_arguments_raise(call, error, match):
    with pytest.raises(error, match=match):
        call(_DIAG)


def test_numpy_integers_are_accepted():
    res = hf.topk_eigh(_DIAG, np.int64(2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        res.evals,
        torch.tensor([8.0, 7.0], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )
    assert hf.lanczos(_DIAG, np.int32(3)).num_products == 3


# ---- right numbers where the loss weights samples unequally ------------------
def _weighted_problem(loss_fn: nn.Module, batch_size: int) -> Problem:
    problem = make_problem(CASES[0])
    problem.y[[1, 2, 6]] = 2  # ignored where ignore_index=2; batch 3 keeps 1 of 3
    problem.y[10:12] = 2
    return Problem("weighted", problem.model, loss_fn, problem.X, problem.y, batch_size)


WEIGHTED_LOSSES = {
    "ignore_index": nn.CrossEntropyLoss(ignore_index=2),
    "class-weight": nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0]).double()),
    "both+smoothing": nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 2.0, 1.0]).double(),
        ignore_index=2,
        label_smoothing=0.1,
    ),
    "sum+ignore": nn.CrossEntropyLoss(ignore_index=2, reduction="sum"),
}


@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_weighted_losses_match_dense_for_unequal_batches(loss, kind):
    problem = _weighted_problem(WEIGHTED_LOSSES[loss], batch_size=5)
    cls = {"hessian": hf.HessianOperator, "ggn": hf.GGNOperator}[kind]
    op = cls(problem.model, problem.loss_fn, problem.batches)
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(op @ V, DENSE[kind](problem) @ V, rtol=1e-10, atol=1e-12)


def test_batch_with_only_ignored_or_no_samples_is_skipped():
    problem = _weighted_problem(nn.CrossEntropyLoss(ignore_index=2), batch_size=5)
    batches = [(problem.X, problem.y), (problem.X[:0], problem.y[:0])]
    batches.append((problem.X[:2], torch.full((2,), 2)))  # all ignored
    op = hf.GGNOperator(problem.model, problem.loss_fn, batches, cache_graph=False)
    assert op.num_data == 15
    v = torch.ones(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        op @ v, DENSE["ggn"](problem) @ v, rtol=1e-10, atol=1e-12
    )


def test_empirical_fisher_refuses_unequal_sample_weights():
    problem = _weighted_problem(nn.CrossEntropyLoss(ignore_index=2), batch_size=5)
    with pytest.raises(NotImplementedError, match="ignore_index=2.*HessianOperator"):
        hf.EmpiricalFisherOperator(problem.model, problem.loss_fn, problem.batches)
    weighted = nn.CrossEntropyLoss(weight=torch.ones(3).double())
    with pytest.raises(NotImplementedError, match="class weights"):
        hf.EmpiricalFisherOperator(problem.model, weighted, problem.batches)


def test_kl_batchmean_matches_dense():
    problem = make_problem(CASES[0])
    target = torch.softmax(torch.randn(13, 3, dtype=torch.float64), 1)
    loss_fn = nn.KLDivLoss(reduction="batchmean")
    problem = Problem("kl", problem.model, loss_fn, problem.X, target, 5)
    for kind, cls in [("hessian", hf.HessianOperator), ("ggn", hf.GGNOperator)]:
        op = cls(problem.model, loss_fn, problem.batches)
        v = torch.ones(op.shape[0], dtype=torch.float64)
        torch.testing.assert_close(
            op @ v, DENSE[kind](problem) @ v, rtol=1e-10, atol=1e-12
        )


def test_batches_on_another_device_are_moved():
    problem = _problem()
    op = hf.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    assert op.device == problem.X.device  # CPU-only here; CUDA checked on a GPU
    v = torch.ones(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        op @ v, DENSE["hessian"](problem) @ v, rtol=1e-10, atol=1e-12
    )


def test_tied_weights_match_dense():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight  # one Parameter used by two layers
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    problem = Problem("tied", model, nn.CrossEntropyLoss(), X, y, 4)
    for kind, cls in [("hessian", hf.HessianOperator), ("ggn", hf.GGNOperator)]:
        op = cls(model, problem.loss_fn, problem.batches)
        v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
        torch.testing.assert_close(
            op @ v, DENSE[kind](problem) @ v, rtol=1e-10, atol=1e-12
        )


def test_integer_and_non_tensor_vectors_are_refused():
    problem = _problem()
    op = hf.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    D = op.shape[0]
    with pytest.raises(TypeError, match="floating-point.*int64.*v.double"):
        op @ torch.ones(D, dtype=torch.long)
    ints = [torch.ones_like(p, dtype=torch.int32) for p in problem.params()]
    with pytest.raises(TypeError, match="floating-point.*int32"):
        op @ ints
    with pytest.raises(TypeError, match="V must be a tensor"):
        op.matmat(np.ones((D, 1)))
    with pytest.raises(ValueError, match="no effect with method='hutchinson'"):
        hf.hutchinson_trace(op, 10, method="hutchinson", num_deflation=3)


@pytest.mark.parametrize(
    "loss_fn", [nn.NLLLoss(), nn.L1Loss(), nn.MultiMarginLoss(p=1)], ids=str
)
def test_ggn_refuses_losses_linear_in_the_output(loss_fn):
    problem = _problem()
    with pytest.raises(NotImplementedError, match="piecewise linear.*HessianOperator"):
        hf.GGNOperator(problem.model, loss_fn, problem.batches)
    if isinstance(loss_fn, nn.NLLLoss):  # the Hessian is still defined
        hf.HessianOperator(problem.model, loss_fn, problem.batches)
