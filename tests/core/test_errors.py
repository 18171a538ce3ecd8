"""Bad input raises a clear error and leaves the model and .grad untouched."""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import vivitlib
from tests.core.cases import CASES, make_problem
from vivitlib.errors import DisconnectedLossError, UnsupportedError

_MLP = CASES[0]


@pytest.fixture
def problem():
    return make_problem(_MLP)


def _prime_grads(problem):
    """Give every parameter a known .grad, return copies of grads and params."""
    for p in problem.params:
        p.grad = torch.full_like(p, 0.25)
    return [p.grad.clone() for p in problem.params], [
        p.detach().clone() for p in problem.params
    ]


def _assert_untouched(problem, grads, params):
    for p, g, v in zip(problem.params, grads, params):
        assert torch.equal(p.grad, g)
        assert torch.equal(p.detach(), v)
        assert not [k for k in vars(p) if k.startswith("_vivitlib")]


def _run_expecting(problem, ggn, exc, match, X=None, y=None, scale=None):
    grads, params = _prime_grads(problem)
    X = problem.X if X is None else X
    y = problem.y if y is None else y
    with pytest.raises(exc, match=match):
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            loss = problem.loss_fn(problem.model(X), y)
            (loss if scale is None else scale * loss).backward()
    _assert_untouched(problem, grads, params)
    with pytest.raises(RuntimeError, match="No curvature"):
        ggn.blocks  # noqa: B018


def test_results_before_backward(problem):
    ggn = vivitlib.LowRankGGN(problem.params)
    with pytest.raises(RuntimeError, match="No curvature has been collected"):
        ggn.blocks  # noqa: B018


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(subsampling=[0, 1, 99]), "index 99.*only 6 samples"),
        (dict(grad_subsampling=[6]), "grad_subsampling holds index 6"),
    ],
)
def test_out_of_range_indices(problem, kwargs, match):
    _run_expecting(
        problem, vivitlib.LowRankGGN(problem.params, **kwargs), ValueError, match
    )


@pytest.mark.parametrize(
    "indices, exc, match",
    [
        ([1, 1], ValueError, "duplicate indices \\[1\\]"),
        ([-1], ValueError, "negative"),
        ([], ValueError, "empty"),
        ([0.5], TypeError, "ints"),
        (torch.tensor([0.0]), TypeError, "integers"),
    ],
)
def test_bad_indices_at_construction(problem, indices, exc, match):
    with pytest.raises(exc, match=match):
        vivitlib.LowRankGGN(problem.params, subsampling=indices)
    with pytest.raises(exc, match=match):
        vivitlib.LowRankGGN(problem.params, grad_subsampling=indices)


def test_bad_groups(problem):
    p = problem.params
    with pytest.raises(ValueError, match="two groups"):
        vivitlib.LowRankGGN([{"params": [p[0]]}, {"params": [p[0], p[1]]}])
    with pytest.raises(ValueError, match="twice"):
        vivitlib.LowRankGGN([p[0], p[0]])
    with pytest.raises(ValueError, match="empty"):
        vivitlib.LowRankGGN([{"params": []}])
    with pytest.raises(ValueError, match="params is empty"):
        vivitlib.LowRankGGN([])
    with pytest.raises(TypeError, match="single tensor"):
        vivitlib.LowRankGGN(p[0])
    with pytest.raises(TypeError, match="mixes"):
        vivitlib.LowRankGGN([p[0], {"params": [p[1]]}])
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        vivitlib.LowRankGGN([frozen])


def test_bad_options(problem):
    with pytest.raises(ValueError, match="compute must be"):
        vivitlib.LowRankGGN(problem.params, compute=("eigenvalue",))
    with pytest.raises(ValueError, match="mc_samples"):
        vivitlib.LowRankGGN(problem.params, mc_samples=-1)
    with pytest.raises(ValueError, match="eigh_dtype"):
        vivitlib.LowRankGGN(problem.params, eigh_dtype=torch.float16)


def test_nan_input(problem):
    X = problem.X.clone()
    X[2, 1] = float("nan")
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params), ValueError,
                   "model output contains NaN", X=X)  # fmt: skip


def test_inf_target_in_loss():
    problem = make_problem(CASES[2])  # MSE
    y = problem.y.clone()
    y[0, 0] = float("inf")
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params), ValueError,
                   "loss contains NaN or Inf", y=y)  # fmt: skip


def test_loss_not_last_operation(problem):
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params), ValueError,
                   "last operation", scale=2.0)  # fmt: skip


def test_batchnorm_in_train_mode():
    problem = make_problem(next(c for c in CASES if c["id"] == "batchnorm-eval-ce"))
    problem.model.train()
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params), ValueError,
                   "train mode.*model.eval\\(\\)")  # fmt: skip


def test_batchnorm_without_running_statistics():
    """Batch statistics even in eval mode: refused like train mode."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 2),
    ).double().eval())  # fmt: skip
    from tests.core.cases import Problem

    problem = Problem(model, extend(nn.CrossEntropyLoss()),
                      torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,)))  # fmt: skip
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params), ValueError,
                   "no running statistics.*track_running_stats=True")  # fmt: skip


def test_unsupported_layer():
    torch.manual_seed(0)
    model = extend(
        nn.Sequential(nn.Linear(4, 3), nn.Softplus(), nn.Linear(3, 2)).double()
    )
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    from tests.core.cases import Problem

    problem = Problem(model, loss_fn, X, y)
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params), UnsupportedError,
                   "Softplus is not supported")  # fmt: skip


def test_loss_not_extended():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3)).double())
    from tests.core.cases import Problem

    problem = Problem(model, nn.CrossEntropyLoss(), torch.randn(5, 4).double(),
                      torch.randint(0, 3, (5,)))  # fmt: skip
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params),
                   DisconnectedLossError, "extend the loss function")  # fmt: skip


def test_model_not_extended():
    torch.manual_seed(0)
    from tests.core.cases import Problem

    problem = Problem(nn.Sequential(nn.Linear(4, 3)).double(), extend(nn.CrossEntropyLoss()),
                      torch.randn(5, 4).double(), torch.randint(0, 3, (5,)))  # fmt: skip
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    with pytest.raises(RuntimeError, match="received no GGN factor.*backpack.extend"):
        ggn.blocks  # noqa: B018


def test_missing_extension_hook(problem):
    ggn = vivitlib.LowRankGGN(problem.params)
    with backpack(*ggn.extensions):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
    with pytest.raises(RuntimeError, match="extension_hook=ggn.hook"):
        ggn.blocks  # noqa: B018
    assert not [k for p in problem.params for k in vars(p) if k.startswith("_vivitlib")]


def test_nan_gram_is_refused():
    gram = torch.eye(3, dtype=torch.float64)
    gram[0, 1] = float("nan")
    with pytest.raises(ValueError, match="Gram matrix contains NaN"):
        vivitlib.linalg.gram_eigh(gram)


def test_bad_damping(problem):
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block = ggn.blocks[0]
    with pytest.raises(ValueError, match="damping must be >= 0"):
        block.newton_step(-1.0)
    with pytest.raises(ValueError, match="shape"):
        block.newton_step(torch.zeros(block.num_directions + 1))


def test_module_used_twice():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()
    model = extend(nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3).double()))
    from tests.core.cases import Problem

    problem = Problem(model, extend(nn.CrossEntropyLoss()),
                      torch.randn(5, 4).double(), torch.randint(0, 3, (5,)))  # fmt: skip
    _run_expecting(problem, vivitlib.LowRankGGN(problem.params), RuntimeError,
                   "more than once in the forward pass")  # fmt: skip


def test_frozen_parameters_are_skipped():
    problem = make_problem(_MLP)
    first = problem.params[0]
    first.requires_grad_(False)
    ggn = vivitlib.LowRankGGN(problem.model.parameters())
    assert all(p is not first for p in ggn.param_groups[0]["params"])
    problem.run(ggn)
    dense = problem.dense(params=problem.params)
    evals = torch.linalg.eigvalsh(dense.ggn).flip(0)[: ggn.blocks[0].num_directions]
    torch.testing.assert_close(ggn.blocks[0].evals, evals, rtol=1e-7, atol=1e-12)
