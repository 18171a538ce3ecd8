"""A linear layer's ``Jᵀ`` as a pending map (:mod:`vivitlib.extensions.linear_backprop`).

The map and its narrowed / sample-block forms must equal BackPACK's stock
``jac_t_mat_prod``; under a budget a wide linear layer (``in > out``, the first
one after ``Flatten`` in a CNN) keeps its input factor lazy, never formed
whole, and every result still equals the dense ``torch.func`` reference.
"""

import warnings

import pytest
import torch
from backpack.core.derivatives.linear import LinearDerivatives
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense, layerwise_results
from vivitlib.extensions import linear_backprop
from vivitlib.extensions.backpack_ext import FACTORED_SQRT
from vivitlib.extensions.lazy import LazyColumns, PendingOp
from vivitlib.extensions.linear_backprop import LazyLinearDerivatives
from vivitlib.factors import cost_model
from vivitlib.memory import MemoryBudget, MemoryBudgetWarning, memory_budget


def _linear(in_shape, out_features=3, seed=0):
    """A float64 linear layer with a stored input ``[N, *in_shape]``."""
    gen = torch.Generator().manual_seed(seed)
    module = nn.Linear(in_shape[-1], out_features).double()
    module.input0 = torch.randn(*in_shape, generator=gen, dtype=torch.float64)
    return module, gen


def _stock(module, mat, subsampling=None):
    return LinearDerivatives()._jac_t_mat_prod(module, None, None, mat, subsampling)


@pytest.mark.parametrize("subsampling", [None, [4, 0, 2]], ids=["all", "sub"])
@pytest.mark.parametrize("in_shape", [(5, 7), (5, 2, 7)], ids=["2d", "3d"])
def test_pending_map_equals_backpack(in_shape, subsampling):
    module, gen = _linear(in_shape)
    N = in_shape[0] if subsampling is None else len(subsampling)
    mat = torch.randn(4, N, *in_shape[1:-1], 3, generator=gen, dtype=torch.float64)
    expected = _stock(module, mat, subsampling)
    op = LazyLinearDerivatives().column_op(module, subsampling=subsampling)
    assert op.shape == (N, *in_shape[1:]) and op.fresh
    torch.testing.assert_close(op.fn(mat, False), expected)
    # a block of samples, alone and through LazyColumns
    torch.testing.assert_close(op.samples(1, 3)(mat[:, 1:3], False), expected[:, 1:3])
    lazy = LazyColumns(mat).then(op)
    assert lazy.shape == expected.shape and lazy.sample_narrowable
    torch.testing.assert_close(lazy.columns(1, 3, samples=(0, 2)), expected[1:3, :2])
    torch.testing.assert_close(lazy.materialise(), expected)
    if len(in_shape) == 2:
        # input features o0:o1 need all output features of the layer
        fn, needed = op.narrow(2, 5)
        assert needed is None
        torch.testing.assert_close(fn(mat, False), expected[:, :, 2:5])
        torch.testing.assert_close(lazy.channels(2, 5), expected[:, :, 2:5])
    else:
        # axis 2 is not the feature axis
        assert op.narrow is None and not lazy.narrowable


def test_grows_only_under_a_budget_and_for_wide_inputs():
    derivatives = LazyLinearDerivatives()
    wide, narrow = nn.Linear(8, 3), nn.Linear(3, 8)
    assert not derivatives.grows(wide)  # no budget: the default pass is unchanged
    with memory_budget(MemoryBudget.split(10**6)):
        assert derivatives.grows(wide)
        assert not derivatives.grows(narrow)
        assert not derivatives.grows(nn.Linear(4, 4))


def test_linear_handler_never_takes_a_lazy_factor():
    module, gen = _linear((5, 7))
    mat = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    handler = FACTORED_SQRT[nn.Linear]()
    assert isinstance(handler.derivatives, LazyLinearDerivatives)
    lazy = LazyColumns(mat).then(handler.derivatives.column_op(module))
    assert handler.accepts_lazy(None, module, lazy) is False


class _Ext:
    """The little of an extension the linear handler's steps read."""

    @staticmethod
    def get_subsampling():
        return None


def test_linear_handler_forms_a_lazy_factor_it_is_given():
    """Should a lazy factor reach the linear handler (the ledger forms it
    before), its steps form it and give the formed factor's results."""
    module, gen = _linear((5, 7))
    module.output = module(module.input0)
    mat = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    scale = torch.rand(2, 5, 3, generator=gen, dtype=torch.float64)
    op = PendingOp(lambda x, fresh: x * scale, (5, 3), fresh=True)
    lazy, formed = LazyColumns(mat).then(op), mat * scale
    handler = FACTORED_SQRT[nn.Linear]()
    ext = _Ext()
    got = handler.backpropagate(ext, module, None, None, lazy)
    expected = handler.backpropagate(ext, module, None, None, formed)
    torch.testing.assert_close(got, expected)
    got = handler.weight(ext, module, None, None, lazy)
    expected = handler.weight(ext, module, None, None, formed)
    torch.testing.assert_close(got.dense().v, expected.dense().v)


def _wide_cnn():
    """A convolution, then a linear layer much wider at its input (96 -> 5)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(96, 5), nn.ReLU(), nn.Linear(5, 3),
    )  # fmt: skip


def _wide_cnn_no_bias():
    """The wide linear layer without a bias, between Dropout and a sigmoid."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(96, 5, bias=False), nn.Sigmoid(), nn.Linear(5, 3),
    ).eval()  # fmt: skip


def _wide_mlp():
    """Two linear layers wider at the input; a lazy ``Jᵀ`` reaches the first."""
    return nn.Sequential(
        nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3)
    )


def _seq_linear():
    """A linear layer on extra input dimensions ``[N, 4, 6] -> [N, 4, 2]``."""
    return nn.Sequential(nn.Linear(6, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


NETS = {
    "cnn-ce": dict(model=_wide_cnn, loss=nn.CrossEntropyLoss, x=(6, 2, 8, 12),
                   y=lambda n: torch.randint(0, 3, (n,))),
    "cnn-mse": dict(model=_wide_cnn, loss=nn.MSELoss, x=(5, 2, 8, 12),
                    y=lambda n: torch.randn(n, 3)),
    "cnn-nobias-ce": dict(model=_wide_cnn_no_bias, loss=nn.CrossEntropyLoss,
                          x=(6, 2, 8, 12), y=lambda n: torch.randint(0, 3, (n,))),
    "mlp-ce": dict(model=_wide_mlp, loss=nn.CrossEntropyLoss, x=(6, 9),
                   y=lambda n: torch.randint(0, 3, (n,))),
    "mlp-mse": dict(model=_wide_mlp, loss=nn.MSELoss, x=(5, 9),
                    y=lambda n: torch.randn(n, 3)),
    "seq-mse": dict(model=_seq_linear, loss=nn.MSELoss, x=(5, 4, 6),
                    y=lambda n: torch.randn(n, 2)),
}  # fmt: skip


def _quiet_run(problem, ggn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        problem.run(ggn)
    return ggn.blocks


def _spy_linear(monkeypatch):
    """Record every factor at a linear layer's input: whole ones (by the layer's
    input features) and lazy pieces (by its output features)."""
    whole, pieces = [], []
    real_jac_t = LazyLinearDerivatives._jac_t_mat_prod
    real_times = linear_backprop._times

    def jac_t(self, module, g_inp, g_out, mat, subsampling=None):
        out = real_jac_t(self, module, g_inp, g_out, mat, subsampling)
        whole.append((module.in_features, out.numel()))
        return out

    def times(weight):
        fn = real_times(weight)

        def spy(x, fresh):
            out = fn(x, fresh)
            pieces.append((weight.shape[0], out.shape))
            return out

        return spy

    monkeypatch.setattr(LazyLinearDerivatives, "_jac_t_mat_prod", jac_t)
    monkeypatch.setattr(linear_backprop, "_times", times)
    return whole, pieces


def _force_plan(monkeypatch, plan):
    """The convolution forms its lazy factor a slice of channels (``'channels'``:
    the linear map runs narrowed to input features) or a block of samples
    (``'samples'``) at a time, where it would take whole columns."""
    from vivitlib.extensions import lazy_layers

    real_plan = lazy_layers.lazy_plan
    possible = {"channels": "narrowable", "samples": "sample_narrowable"}[plan]

    def forced(module, quantity, unfoldable, wants=None):
        got = real_plan(module, quantity, unfoldable)
        return plan if got == "columns" and getattr(quantity, possible) else got

    monkeypatch.setattr("vivitlib.extensions.backpack_ext.lazy_plan", forced)


def _spy_sample_steps(monkeypatch):
    """Count the convolution steps that form their factor by sample blocks."""
    from vivitlib.extensions import backpack_ext

    calls = []
    real = backpack_ext.sample_step

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backpack_ext, "sample_step", spy)
    return calls


@pytest.mark.parametrize("plan", ["auto", "channels", "samples"])
@pytest.mark.parametrize("budget", [1, 3000], ids=["1B", "3KB"])
@pytest.mark.parametrize("compute", ["eigenvalues", "all"])
@pytest.mark.parametrize("name", ["cnn-ce", "cnn-mse", "cnn-nobias-ce"])
def test_budgeted_cnn_keeps_the_wide_input_lazy_and_matches_dense(
    monkeypatch, name, compute, budget, plan
):
    if plan != "auto":
        _force_plan(monkeypatch, plan)
    sample_steps = _spy_sample_steps(monkeypatch)
    whole, pieces = _spy_linear(monkeypatch)
    problem = make_problem(NETS[name])
    options = {"compute": "eigenvalues"} if compute == "eigenvalues" else {}
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=budget, **options)
    # the 'pairwise' Gram plan: the convolution forms its factor (behind the
    # linear map) a block of samples at a time
    gram_plan = "pairwise" if plan == "samples" else None
    with cost_model(gram_plan=gram_plan):
        (block,) = _quiet_run(problem, ggn)
    assert bool(sample_steps) == (plan == "samples")
    dense = problem.dense()
    if compute == "eigenvalues":
        evals = torch.linalg.eigvalsh(dense.ggn).flip(0)
        K = block.num_directions
        assert (evals[K:].abs() <= 1e-8 * evals[0]).all()
        torch.testing.assert_close(block.evals, evals[:K], rtol=1e-8, atol=1e-12)
    else:
        assert_block_matches_dense(block, dense)
    # the wide layer's input factor [C, N, 96] (C >= 2) was never formed whole:
    # its Jᵀ ran only as the pending map, at most one column at a time
    assert all(in_features != 96 for in_features, _ in whole)
    wide = [shape for out_features, shape in pieces if out_features == 5]
    N = problem.X.shape[0]
    assert wide and all(shape.numel() <= N * 96 for shape in wide), wide
    if plan == "channels":  # narrowed to a slice of the 96 input features
        assert any(shape[-1] < 96 for shape in wide), wide


def test_unbudgeted_pass_forms_the_linear_input_as_before(monkeypatch):
    whole, pieces = _spy_linear(monkeypatch)
    problem = make_problem(NETS["cnn-ce"])
    (block,) = _quiet_run(problem, vivitlib.LowRankGGN(problem.params))
    assert any(in_features == 96 for in_features, _ in whole) and not pieces


@pytest.mark.parametrize("budget", [1, 600])
@pytest.mark.parametrize("name", ["mlp-ce", "mlp-mse", "seq-mse"])
def test_budgeted_mlp_matches_dense(monkeypatch, name, budget):
    """A lazy ``Jᵀ`` reaching the next linear layer is formed there, exactly."""
    whole, pieces = _spy_linear(monkeypatch)
    problem = make_problem(NETS[name])
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=budget)
    (block,) = _quiet_run(problem, ggn)
    assert_block_matches_dense(block, problem.dense())
    assert pieces  # some linear Jᵀ was kept lazy


def _results(name, **kwargs):
    return layerwise_results(make_problem(NETS[name]), **kwargs)


@pytest.mark.parametrize("budget", [1, 1000], ids=["1B", "1KB"])
@pytest.mark.parametrize("name", ["cnn-ce", "mlp-mse"])
def test_monte_carlo_and_subsampling_unchanged_by_budget(monkeypatch, name, budget):
    """MC factors and sub-sampled columns: the budgeted pass equals the
    unbudgeted one (itself checked against the dense reference elsewhere)."""
    options = dict(mc_samples=2, subsampling=[3, 0, 2], grad_subsampling=[1, 2])
    reference = _results(name, **options)
    _, pieces = _spy_linear(monkeypatch)
    budgeted = _results(name, max_memory=budget, **options)
    assert pieces
    for ref, got in zip(reference, budgeted, strict=True):
        for a, b in zip(ref, got, strict=True):
            if a is ref[3]:  # eigenvectors up to sign
                b = b * torch.sign((a * b).sum(1, keepdim=True))
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["cnn-ce", "cnn-nobias-ce"])
def test_float32_budgeted_pass_equals_the_unbudgeted_one(monkeypatch, name):
    """In float32 the lazy linear map gives the unbudgeted pass's numbers up to
    float32 round-off (the unbudgeted pass is checked in float64 elsewhere)."""
    import dataclasses

    def float32_problem():
        problem = make_problem(NETS[name])
        problem.model.float()
        return dataclasses.replace(problem, X=problem.X.float())

    def run(**options):
        problem = float32_problem()
        ggn = vivitlib.LowRankGGN(problem.params, **options)
        (block,) = _quiet_run(problem, ggn)
        return block.evals, block.newton_step(0.1)

    reference = run()
    _, pieces = _spy_linear(monkeypatch)
    budgeted = run(max_memory=1)
    assert any(out_features == 5 for out_features, _ in pieces)  # the lazy map ran
    assert budgeted[1][0].dtype == torch.float32  # a float32 pass (Gram in float64)
    torch.testing.assert_close(budgeted[0], reference[0], rtol=1e-4, atol=1e-6)
    for got, expected in zip(budgeted[1], reference[1], strict=True):
        scale = expected.abs().max()
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * scale)
