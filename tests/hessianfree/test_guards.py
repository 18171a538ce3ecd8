"""Issue 10: no stale, silent or NaN answer from an operator after the model changed.

Every product is compared with a dense float64 torch.func reference at the
parameters the model holds *now*; every refusal asserts the error type, its
message (problem and fix) and that parameters and ``.grad`` are untouched.
"""

import pytest
import torch
from torch import nn

from tests.hessianfree.cases import CASES, DENSE, Problem, make_problem
from vivitlib import hessianfree as hf
from vivitlib._checks import check_finite

OPERATORS = {
    "hessian": hf.HessianOperator,
    "ggn": hf.GGNOperator,
    "ef": hf.EmpiricalFisherOperator,
}


def _state(model: nn.Module) -> list:
    """Clones of every parameter and its ``.grad``."""
    return [
        (p.detach().clone(), None if p.grad is None else p.grad.clone())
        for p in model.parameters()
    ]


def assert_untouched(model: nn.Module, before: list) -> None:
    for p, (value, grad) in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0, equal_nan=True)
        assert (p.grad is None) == (grad is None)
        if grad is not None:
            assert torch.equal(p.grad, grad)


def _with_grads(problem: Problem) -> None:
    for p in problem.model.parameters():
        p.grad = torch.full_like(p, 0.25)


def _check(op, problem: Problem, kind: str, v: torch.Tensor) -> None:
    ref = DENSE[kind](problem) @ v
    torch.testing.assert_close(op @ v, ref, rtol=1e-10, atol=1e-12)


# ---- 1. the graph cache follows every parameter change ----------------------
def _mul_data(model):
    for p in model.parameters():
        p.data.mul_(1.5)


def _assign_data(model):
    for p in model.parameters():
        p.data = p.data * 0.7 + 0.1


def _no_grad_add(model):
    with torch.no_grad():
        next(model.parameters()).add_(0.3)


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("change", [_mul_data, _assign_data, _no_grad_add])
def test_cached_graph_follows_parameter_changes(kind, change):
    problem = make_problem(CASES[0])
    data = (problem.X, problem.y)
    op = OPERATORS[kind](problem.model, problem.loss_fn, data, cache_graph=True)
    v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
    _check(op, problem, kind, v)
    change(problem.model)
    _check(op, problem, kind, v)
    _check(op, problem, kind, v)  # and the rebuilt cache is reused correctly


def test_cached_graph_follows_changes_of_parameters_outside_params():
    problem = make_problem(CASES[0])
    chosen = problem.params()[2:]  # the last layer only
    op = hf.HessianOperator(
        problem.model, problem.loss_fn, (problem.X, problem.y), params=chosen
    )
    v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
    op @ v
    problem.model[0].weight.data.mul_(2.0)  # not differentiated, but in the graph
    start = sum(p.numel() for p in problem.params()[:2])
    block = DENSE["hessian"](problem)[start:, start:]
    torch.testing.assert_close(op @ v, block @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [None, True, False])
@pytest.mark.parametrize("num_batches", [1, 2])
def test_products_follow_replaced_or_edited_list_data(cache_graph, num_batches):
    problem = make_problem(CASES[0])
    data = [
        (X.clone(), y.clone())
        for X, y in zip(problem.X.chunk(num_batches), problem.y.chunk(num_batches))
    ]
    op = hf.GGNOperator(problem.model, problem.loss_fn, data, cache_graph=cache_graph)
    v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
    _check(op, problem, "ggn", v)
    with torch.no_grad():
        data[0][0].mul_(0.5)  # in place: a new version
    problem.X = torch.cat([X for X, _ in data])
    _check(op, problem, "ggn", v)
    data[0] = (data[0][0][:4], data[0][1][:4])  # replaced by a smaller batch
    problem.X = torch.cat([X for X, _ in data])
    problem.y = torch.cat([y for _, y in data])
    _check(op, problem, "ggn", v)
    assert op.num_data == problem.X.shape[0]


def test_cached_graph_follows_buffer_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model = model.double().eval()
    X, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    problem = Problem("bn", model, nn.CrossEntropyLoss(), X, y, 7)
    op = hf.GGNOperator(model, problem.loss_fn, (X, y))
    v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
    _check(op, problem, "ggn", v)
    model[1].running_var.data.mul_(4.0)  # invisible to autograd's versions
    _check(op, problem, "ggn", v)


def test_no_grad_context_gives_the_right_product():
    problem = make_problem(CASES[0])  # several batches: rebuilt every product
    op = hf.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    with torch.no_grad():
        _check(op, problem, "hessian", v)


def test_inference_mode_is_refused():
    problem = make_problem(CASES[0])
    op = hf.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


# ---- 2. train mode, frozen or converted parameters after the build ----------
def _dropout_problem() -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2))
    model = model.double().eval()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    return Problem("dropout", model, nn.CrossEntropyLoss(), X, y, 8)


def _freeze(model):
    next(model.parameters()).requires_grad_(False)


def _double(model):
    model.float()


@pytest.mark.parametrize(
    "change, match",
    [
        (nn.Module.train, "train mode.*after the operator was built.*model.eval"),
        (_freeze, "was frozen.*requires_grad=True.*params="),
        (_double, "changed from.*model.double.*Build a new operator"),
    ],
)
def test_model_changes_after_build_raise(change, match):
    problem = _dropout_problem()
    op = hf.HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.y))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    _check(op, problem, "hessian", v)
    change(problem.model)
    _with_grads(problem)
    before = _state(problem.model)
    with pytest.raises(ValueError, match=match):
        op @ v
    assert_untouched(problem.model, before)
    if change is nn.Module.train:
        problem.model.eval()
        _check(op, problem, "hessian", v)


class _FunctionalDropout(nn.Module):
    """Dropout through nn.functional: invisible to a scan for nn.Dropout."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(nn.functional.dropout(x, 0.5, training=self.training))


def test_functional_dropout_switched_to_train_mode_raises():
    model = _FunctionalDropout().eval()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    op = hf.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    model.train()
    with pytest.raises(ValueError, match="'' .*now in train mode.*model.eval"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_batchnorm_switched_to_train_mode_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model = model.double().eval()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = hf.GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    model.train()
    running = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="batch norm in train mode.*model.eval"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert torch.equal(model[1].running_mean, running)


# ---- 3. non-finite parameters, vectors, matrices and products ---------------
@pytest.mark.parametrize(
    "value, algorithm",
    [
        (float("inf"), lambda op: hf.hutchinson_trace(op, 10)),
        (float("nan"), lambda op: hf.topk_eigh(op, 2)),
        (float("nan"), lambda op: hf.spectral_density(op, num_iters=5, num_probes=2)),
        (float("inf"), lambda op: hf.power_iteration(op, 1)),
    ],
)
def test_non_finite_parameter_raises_naming_it(value, algorithm):
    problem = make_problem(CASES[0])
    op = hf.HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.y))
    op @ torch.ones(op.shape[0], dtype=torch.float64)  # a cached graph exists
    problem.model[2].weight.data[0, 0] = value
    _with_grads(problem)
    before = _state(problem.model)
    with pytest.raises(ValueError, match=r"\['2.weight'\] contain NaN or Inf.*Restore"):
        algorithm(op)
    assert_untouched(problem.model, before)


def test_non_finite_parameter_at_build_raises():
    problem = make_problem(CASES[0])
    problem.model[0].bias.data[1] = float("nan")
    with pytest.raises(ValueError, match=r"\['0.bias'\] contain NaN"):
        hf.GGNOperator(problem.model, problem.loss_fn, problem.batches)


def test_huge_finite_values_are_not_mistaken_for_inf():
    huge = torch.tensor([1e308, 1e308], dtype=torch.float64)  # the sum overflows
    check_finite(huge, "huge", "")  # no error: the element-wise test decides
    model = nn.Linear(2, 1).double()
    model.weight.data.fill_(1e308)  # GGN of a linear model: independent of it
    X, y = torch.ones(3, 2, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)
    op = hf.GGNOperator(model, nn.MSELoss(), (X, y), check_deterministic=False)
    G = torch.full((3, 3), 2.0, dtype=torch.float64)  # 2/N Σ [x, 1][x, 1]ᵀ
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(op @ v, G @ v, rtol=1e-12, atol=0)


def test_overflowing_product_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].weight.data.fill_(1e25)  # float32: J ~ 1e25, JᵀJ overflows
    X, y = torch.ones(4, 2), torch.zeros(4, 1)
    with pytest.raises(ValueError, match="product contains NaN or Inf.*overflow"):
        hf.GGNOperator(model, nn.MSELoss(), (X, y))


def test_non_finite_vector_and_operators_raise():
    problem = make_problem(CASES[0])
    op = hf.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="v contains NaN or Inf.*finite"):
        op @ v
    with pytest.raises(ValueError, match="v0 contains NaN"):
        hf.lanczos(op, 3, v0=v)
    A = torch.eye(4, dtype=torch.float64)
    A[1, 2] = float("inf")
    with pytest.raises(ValueError, match="matrix op contains NaN or Inf"):
        hf.topk_eigh(A, 1)
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    bad = scipy_linalg.LinearOperator((4, 4), matvec=lambda x: x * float("nan"))
    with pytest.raises(ValueError, match="product of op contains NaN"):
        hf.lanczos(bad, 2)


# ---- 4. k against the dimension, zero operators -----------------------------
_DIAG = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))  # 5 x 5


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda A: hf.power_iteration(A, 6), "k"),
        (lambda A: hf.topk_eigh(A, 6), "k"),
        (lambda A: hf.lanczos(A, 6), "num_iters"),
        (lambda A: hf.sketch(A, 6), "size"),
        (lambda A: hf.spectral_density(A), "num_iters"),
        (lambda A: hf.hutchinson_trace(A, 20, num_deflation=6), "num_deflation"),
    ],
)
def test_arguments_beyond_the_dimension_raise(call, name):
    with pytest.raises(ValueError, match=rf"{name} must be at most D=5.*{name} <= 5"):
        call(_DIAG)


def test_power_iteration_all_eigenpairs_are_distinct():
    res = hf.power_iteration(_DIAG, 5, tol=1e-12, max_iters=2000)
    torch.testing.assert_close(
        res.evals,
        torch.arange(5.0, 0.0, -1, dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )
    Q = res.flat_evecs
    torch.testing.assert_close(
        Q.T @ Q, torch.eye(5, dtype=torch.float64), atol=1e-8, rtol=0
    )


def test_power_iteration_has_no_absolute_tolerance_floor():
    tiny = 1e-9 * _DIAG  # a well-trained net's curvature can be this small
    res = hf.power_iteration(tiny, 1, tol=1e-8, max_iters=5000)
    assert res.evals[0].item() == pytest.approx(5e-9, rel=1e-4)


def test_power_iteration_fills_the_whole_null_space():
    zero = torch.zeros(5, 5, dtype=torch.float64)  # Rademacher draws repeat in 5-d
    res = hf.power_iteration(zero, 5)
    assert torch.equal(res.evals, torch.zeros(5, dtype=torch.float64))
    Q = res.flat_evecs
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(Q.T @ Q, eye, atol=1e-12, rtol=0)


def _zero_hessian_operator():
    """Linear model + L1 loss: the Hessian is exactly zero (D = 8)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = (
        torch.randn(6, 3, dtype=torch.float64),
        torch.randn(6, 2, dtype=torch.float64),
    )
    return hf.HessianOperator(model, nn.L1Loss(), (X, y))


@pytest.mark.parametrize(
    "op", [torch.zeros(5, 5, dtype=torch.float64), _zero_hessian_operator()]
)
def test_zero_operator_answers(op):
    D = op.shape[0]
    for res in (hf.power_iteration(op, 2), hf.topk_eigh(op, 2)):
        assert torch.equal(res.evals, torch.zeros(2, dtype=torch.float64))
        assert torch.isfinite(res.flat_evecs).all()
    assert hf.hutchinson_trace(op, 6).estimate == 0.0
    assert torch.equal(hf.sketch(op, 3).evals, torch.zeros(3, dtype=torch.float64))
    sd = hf.spectral_density(op, num_iters=3, num_probes=2, deflate=1)
    assert torch.equal(sd.nodes, torch.zeros_like(sd.nodes))
    assert torch.isfinite(sd.density).all()
    mass = torch.trapezoid(sd.density, sd.grid).item()
    assert mass == pytest.approx(1.0, rel=1e-3)
    assert sd.grid[sd.density.argmax()].abs() < 1e-10
    # ---- 5. the log density names what the user can change, nothing internal
    with pytest.raises(ValueError, match="every Ritz value is 0.*log=False.*log_eps"):
        hf.spectral_density(op, num_iters=3, num_probes=2, deflate=0, log=True)
    sd = hf.spectral_density(op, num_iters=3, num_probes=2, log=True, log_eps=1e-3)
    assert sd.nodes.abs().max() == 0 and D > 0


# ---- 5. messages name what the user passed ----------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda A: hf.hutchinson_trace(A, 2), "num_probes=2 is too small.*'krylov'"),
        (lambda A: hf.hutchinson_trace(A, 3, method="hutch++"), "num_probes=3 .*>= 4"),
        (lambda A: hf.hutchinson_trace(A, 1, method="hutchinson"), "num_probes=1"),
        (lambda A: hf.topk_eigh(A, 3, max_products=2), "max_products=2 .*k=3"),
    ],
)
def test_messages_name_user_arguments(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call(_DIAG)
    assert "num_deflation" not in str(info.value)


def test_small_budgets_that_fit_work():
    exact = torch.trace(_DIAG).item()
    assert hf.hutchinson_trace(_DIAG, 3).num_products == 3
    est = hf.hutchinson_trace(_DIAG, 12, num_deflation=5)  # spans all of R^5
    assert est.estimate == pytest.approx(exact, rel=1e-12)
