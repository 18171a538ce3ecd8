"""Issue 10 (trust): inputs that once gave a silent wrong number.

Each case asserts the right number against the dense float64 reference, or the
error type, its message and that parameters and ``.grad`` are untouched.
"""

import copy
import warnings

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import vivitlib
from tests.core.cases import CASES, make_problem
from tests.core.helpers import flat_evecs
from tests.core.test_errors import _run_expecting
from tests.reference import dense_curvature, eigh_desc
from vivitlib.errors import StalePassWarning, UnsupportedError

_BY_ID = {c["id"]: c for c in CASES}


def _pass(collector, model, loss_fn, X, y, **context):
    with backpack(*collector.extensions, extension_hook=collector.hook, **context):
        loss = loss_fn(model(X), y)
        loss.backward()
    return loss


# -- per-sample quantities do not depend on the reduction (item 4) -----------


@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.MSELoss])
def test_per_sample_quantities_independent_of_reduction(loss_cls):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())
    X = torch.randn(7, 4, dtype=torch.float64)
    y = (
        torch.randint(0, 3, (7,))
        if loss_cls is nn.CrossEntropyLoss
        else torch.randn(7, 3)
    )
    blocks = {}
    for reduction in ("mean", "sum"):
        ggn = vivitlib.LowRankGGN(model.parameters())
        _pass(ggn, model, extend(loss_cls(reduction=reduction)), X, y)
        blocks[reduction] = ggn.blocks[0]
    mean, total = blocks["mean"], blocks["sum"]
    per_sample_elements = 1 if loss_cls is nn.CrossEntropyLoss else 3
    assert mean.batch_scale == pytest.approx(1 / per_sample_elements)
    assert total.batch_scale == pytest.approx(7.0)
    sign = torch.sign(mean.gammas[:1]) * torch.sign(total.gammas[:1])  # evec signs
    torch.testing.assert_close(total.gammas * sign, mean.gammas, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(total.lambdas, mean.lambdas, rtol=1e-8, atol=1e-12)
    ratio = total.batch_scale / mean.batch_scale
    torch.testing.assert_close(total.evals, ratio * mean.evals, rtol=1e-9, atol=0)
    # Newton steps are those of the batch loss as reduced: the 'sum' step with
    # damping scaled like the curvature equals the 'mean' step
    for a, b in zip(total.newton_step(ratio * 0.1), mean.newton_step(0.1)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


# -- the eigenvalue cut-off follows the precision the computation had (item 5)


def _trained_like_mlp(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 10))
    with torch.no_grad():  # spread the spectrum like a partly trained net
        model[2].weight.mul_(4.0)
    return extend(model.to(dtype))


def _evals(model, dtype, X, y, **kwargs):
    model = extend(copy.deepcopy(model).to(dtype))
    ggn = vivitlib.LowRankGGN(model.parameters(), compute=("eigenvalues",), **kwargs)
    _pass(ggn, model, extend(nn.CrossEntropyLoss()), X.to(dtype), y)
    return ggn.blocks[0].evals


def test_float32_cutoff_keeps_what_float32_resolves():
    model = _trained_like_mlp(torch.float64)
    torch.manual_seed(4)
    X, y = 3 * torch.randn(48, 30), torch.randint(0, 10, (48,))
    reference = _evals(model, torch.float64, X, y, rtol=0.0)
    kept = _evals(model, torch.float32, X, y)
    raw = _evals(model, torch.float32, X, y, rtol=0.0)
    # every kept float32 eigenvalue agrees with float64 (stated tolerance 1e-3)
    rel = (kept - reference[: len(kept)]).abs() / reference[: len(kept)]
    assert rel.max() < 1e-3
    # eigenvalues float32 resolves to 5 % (the leading run of them) are kept
    m = min(len(raw), len(reference))
    good = ((raw[:m] - reference[:m]).abs() / reference[:m]) < 0.05
    resolved = int(good.long().cumprod(0).sum())
    assert len(kept) >= 0.95 * resolved, (len(kept), resolved)
    # far more than the classical M·ε rule keeps
    classical = vivitlib.linalg.default_rtol(480, torch.float32)
    assert len(kept) > len(_evals(model, torch.float32, X, y, rtol=classical))


def test_float32_eigensolver_on_float64_factor_keeps_only_the_rank():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 10)).double())
    rank = sum(p.numel() for p in model.parameters())  # D = 78 < N·(C-1) = 180
    X, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 10, (20,))
    ggn = vivitlib.LowRankGGN(model.parameters(), eigh_dtype=torch.float32)
    _pass(ggn, model, extend(nn.CrossEntropyLoss()), X, y)
    block = ggn.blocks[0]
    assert block.num_directions <= rank
    E = flat_evecs(block)
    err = (E @ E.T - torch.eye(len(E), dtype=E.dtype)).abs().max()
    assert err < 1e-2


@pytest.mark.parametrize(
    "rtol, exc", [(-1.0, ValueError), (float("nan"), ValueError), (1.0, ValueError),
                  ("1e-3", TypeError), (True, TypeError)],
)  # fmt: skip
def test_bad_rtol_is_refused(rtol, exc):
    with pytest.raises(exc, match="rtol"):
        vivitlib.LowRankGGN([nn.Parameter(torch.ones(2))], rtol=rtol)
    with pytest.raises(exc, match="rtol"):
        vivitlib.linalg.gram_eigh(torch.eye(3), rtol=rtol)


# -- tied weights (item 2) -----------------------------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight  # tied
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.second(self.act(self.first(x))))


def test_tied_weights_are_refused_by_the_gram_route():
    torch.manual_seed(0)
    model = extend(_Tied().double(), use_converter=True)
    params = list(model.parameters())
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    ggn = vivitlib.LowRankGGN(params)
    with pytest.raises(UnsupportedError, match="tied weights.*Untie"):
        _pass(ggn, model, extend(nn.CrossEntropyLoss()), X, y)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)


def test_tied_weights_are_exact_for_directional_derivatives():
    torch.manual_seed(0)
    model = extend(_Tied().double(), use_converter=True)
    params = list(model.parameters())
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    directions = [torch.randn(2, *p.shape, dtype=torch.float64) for p in params]
    dd = vivitlib.DirectionalDerivatives(params, directions)
    loss_fn = extend(nn.CrossEntropyLoss())
    _pass(dd, model, loss_fn, X, y)
    dense = dense_curvature(model, loss_fn, X, y, params)
    D = torch.cat([d.flatten(1) for d in directions], 1)
    torch.testing.assert_close(dd.gammas, dense.per_sample_grads @ D.T)
    expected = torch.einsum("kd,nde,ke->nk", D, dense.per_sample_ggn, D)
    torch.testing.assert_close(dd.lambdas, expected)


# -- DirectionalDerivatives input (item 6) ---------------------------------------


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda ps: [torch.full((2, *p.shape), float("nan")) for p in ps], ValueError,
         "NaN or Inf"),
        (lambda ps: [torch.full((1, *p.shape), float("inf")) for p in ps], ValueError,
         "NaN or Inf"),
        (lambda ps: [torch.zeros(0, *p.shape) for p in ps], ValueError, "K = 0"),
        (lambda ps: [torch.ones(p.shape) for p in ps], ValueError, "no leading K axis"),
        (lambda ps: torch.ones(2, 3), TypeError, "single tensor"),
        (lambda ps: [torch.ones(2, *p.shape, dtype=torch.long) for p in ps], TypeError,
         "floating point"),
    ],
)  # fmt: skip
def test_bad_directions(make, exc, match):
    params = [nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3))]
    with pytest.raises(exc, match=match):
        vivitlib.DirectionalDerivatives(params, make(params))


# -- smaller items (item 8) ------------------------------------------------------


def test_gradient_overlaps_of_a_zero_gradient_are_zero():
    overlaps = vivitlib.linalg.gradient_overlaps(torch.zeros(3), torch.tensor(0.0))
    assert torch.equal(overlaps, torch.zeros(3))


def test_plain_backward_after_a_pass_is_reported():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    assert not ggn.is_stale
    problem.loss_fn(problem.model(problem.X), problem.y).backward()
    assert ggn.is_stale
    with pytest.warns(StalePassWarning, match="earlier curvature pass"):
        ggn.blocks  # noqa: B018
    problem.run(ggn)  # a new pass is current again
    assert not ggn.is_stale


def test_empty_batch(problem_mlp=None):
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    _run_expecting(problem, ggn, ValueError, "mini-batch is empty",
                   X=problem.X[:0], y=problem.y[:0])  # fmt: skip


def test_parameter_frozen_after_construction():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.params[0].requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="frozen.*after this object was built"):
            problem.run(ggn)
    finally:
        problem.params[0].requires_grad_(True)


def test_second_backward_in_one_block():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            loss = problem.loss_fn(problem.model(problem.X), problem.y)
            loss.backward(retain_graph=True)
            loss.backward()
    # with BackPACK's retain_graph the second backward is a fresh, equal pass
    for p in problem.params:
        p.grad = None
    with backpack(*ggn.extensions, extension_hook=ggn.hook, retain_graph=True):
        loss = problem.loss_fn(problem.model(problem.X), problem.y)
        loss.backward(retain_graph=True)
        first = ggn.blocks[0].evals.clone()
        loss.backward()
    torch.testing.assert_close(ggn.blocks[0].evals, first)
    assert not ggn.is_stale


@pytest.mark.parametrize(
    "loss, match",
    [(nn.NLLLoss(), "NLLLoss is not supported"),
     (nn.CrossEntropyLoss(reduction="none"), "reduction='none'")],
)  # fmt: skip
def test_unsupported_losses(loss, match):
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    problem.loss_fn = extend(loss)
    ggn = vivitlib.LowRankGGN(problem.params)
    with pytest.raises((NotImplementedError, ValueError), match=match):
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            problem.loss_fn(problem.model(problem.X), problem.y).sum().backward()


def test_every_target_ignored():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    problem.loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)  # the sum over no sample is a valid, zero loss ...
    ggn_all_ignored = vivitlib.LowRankGGN(problem.params, subsampling=[0])
    with backpack(*ggn_all_ignored.extensions, extension_hook=ggn_all_ignored.hook):
        y = problem.y.clone()
        y[0] = -100
        problem.loss_fn(problem.model(problem.X), y).backward()
    with pytest.raises(ValueError, match="counts none of the curvature samples"):
        ggn_all_ignored.blocks  # noqa: B018 ... but a curvature from none is refused


def test_ignored_samples_leave_no_trace_in_eigenvectors():
    problem = make_problem(_BY_ID["ce-ignore-index-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block = ggn.blocks[0]
    dense = problem.dense()
    evals, _ = eigh_desc(dense.ggn)
    torch.testing.assert_close(block.evals, evals[: block.num_directions])
    assert block.gammas.shape[0] == block.lambdas.shape[0] == 4  # 6 minus 2 ignored


# -- our own machinery raises no warning (item 9) --------------------------------


def test_no_backward_hook_warning_and_filter_is_removed():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem.run(ggn)
        ggn.blocks  # noqa: B018
        assert not [w for w in caught if "backward hook" in str(w.message)]
        warnings.warn(
            "Full backward hook is firing when gradients are computed (x)", stacklevel=1
        )
    assert [w for w in caught if "backward hook" in str(w.message)]


@pytest.mark.parametrize(
    "case_id", ["ce-weights-smoothing-ignore", "ce-ignore-index-sum"]
)
def test_monte_carlo_factor_follows_the_loss_weights(case_id):
    """MC curvatures along fixed directions average to the exact weighted ones."""
    problem = make_problem(_BY_ID[case_id])
    torch.manual_seed(1)
    directions = [torch.randn(3, *p.shape, dtype=torch.float64) for p in problem.params]
    exact = vivitlib.DirectionalDerivatives(problem.params, directions)
    problem.run(exact)
    lambdas, batch_scale = exact.lambdas, exact.batch_scale
    mc = vivitlib.DirectionalDerivatives(problem.params, directions, mc_samples=4000)
    problem.run(mc)
    assert mc.lambdas.shape == lambdas.shape
    torch.testing.assert_close(mc.lambdas, lambdas, rtol=0.1, atol=1e-3)
    assert mc.batch_scale == batch_scale


@pytest.mark.parametrize("case_id", ["mlp-ce-mean", "cnn-ce", "mlp-mse-sum",
                                     "ce-ignore-index-mean"])  # fmt: skip
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_inverse_ggn_product_equals_dense_solve(case_id, damping):
    problem = make_problem(_BY_ID[case_id])
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block = ggn.blocks[0]
    dense = problem.dense().ggn
    torch.manual_seed(0)
    vectors = [torch.randn(2, *p.shape, dtype=torch.float64) for p in problem.params]
    V = torch.cat([v.flatten(1) for v in vectors], 1).T  # [D, 2]
    if damping == 0:
        expected = torch.linalg.pinv(dense, hermitian=True, rtol=1e-9) @ V
    else:
        expected = torch.linalg.solve(dense + damping * torch.eye(len(dense)), V)
    out = block.inverse_ggn_product(vectors, damping)
    got = torch.cat([o.flatten(1) for o in out], 1).T
    torch.testing.assert_close(
        got, expected, rtol=1e-6, atol=1e-8 * expected.abs().max()
    )
    single = block.inverse_ggn_product([v[0] for v in vectors], damping)
    for a, b in zip(single, out):
        torch.testing.assert_close(a, b[0])
    # the plain-tensor version on a user-held V
    flat_V = torch.cat([f.flatten(1) for f in _dense_factor(block)], 1).T
    plain = vivitlib.linalg.inverse_ggn_product(
        flat_V, block.gram_evecs, block.evals, V, damping
    )
    torch.testing.assert_close(
        plain, expected, rtol=1e-6, atol=1e-8 * expected.abs().max()
    )


def _dense_factor(block):
    """``Ṽ`` columns as parameter-shaped tensors (lift unit Gram coordinates)."""
    eye = torch.eye(block.gram.shape[0], dtype=torch.float64)
    basis = block._column_basis  # a deflated cross-entropy factor: C - 1 columns
    if basis is not None:  # public column (n, c) = Σ_j B[n, c, j] · internal (n, j)
        n, C, _ = basis.shape
        eye = torch.einsum("ncj,ncm->njm", basis.double(), eye.view(n, C, -1))
        eye = eye.reshape(-1, n * C)
    return block._apply(eye * block._factor_scale)


@pytest.mark.parametrize(
    "vectors, damping, exc, match",
    [(lambda ps: [torch.ones(3)], 1.0, ValueError, "parameters"),
     (lambda ps: [torch.full_like(p, float("nan")) for p in ps], 1.0, ValueError, "NaN"),
     (lambda ps: [torch.ones_like(p) for p in ps], -1.0, ValueError, "damping"),
     (lambda ps: [torch.ones_like(p) for p in ps], float("inf"), ValueError, "damping"),
     (lambda ps: torch.ones(3), 1.0, TypeError, "single tensor")],
)  # fmt: skip
def test_inverse_ggn_product_bad_input(vectors, damping, exc, match):
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    with pytest.raises(exc, match=match):
        ggn.blocks[0].inverse_ggn_product(vectors(problem.params), damping)


def test_regulariser_added_to_the_loss_is_refused():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    grads = [torch.full_like(p, 0.25) for p in problem.params]
    for p, g in zip(problem.params, grads):
        p.grad = g.clone()
    with pytest.raises(ValueError, match="regulariser added to the loss"):
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            loss = problem.loss_fn(problem.model(problem.X), problem.y)
            (loss + 0.1 * problem.params[0].pow(2).sum()).backward()
    for p, g in zip(problem.params, grads):
        assert torch.equal(p.grad, g)
    with pytest.raises(RuntimeError, match="No curvature"):
        ggn.blocks  # noqa: B018


def test_signal_to_noise_edge_cases():
    samples = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 4.0]], dtype=torch.float64)
    snr = vivitlib.linalg.signal_to_noise(samples)
    assert snr[0] == float("inf") and snr[1] == 0 and snr[2] == pytest.approx(4.5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        vivitlib.linalg.signal_to_noise(samples[:1])


def test_monte_carlo_draws_from_a_generator_are_reproducible():
    problem = make_problem(_BY_ID["mlp-ce-mean"])

    def draw(seed):
        ggn = vivitlib.LowRankGGN(
            problem.params, mc_samples=2, generator=torch.Generator().manual_seed(seed)
        )
        problem.run(ggn)
        return ggn.blocks[0].evals

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again, other = draw(0), draw(0), draw(1)
    assert torch.equal(torch.get_rng_state(), state)  # global state untouched
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert first.shape != other.shape or not torch.allclose(first, other)
    with pytest.raises(TypeError, match="torch.Generator"):
        vivitlib.LowRankGGN(problem.params, mc_samples=1, generator=0)


def test_auto_eigensolver_precision_follows_the_requested_accuracy():
    choose = vivitlib.linalg.choose_eigh_dtype
    assert choose("auto", 2560, None) == torch.float64  # default cut-off: float64
    assert choose("auto", 2560, 1e-6) == torch.float64  # float32 too coarse
    assert choose("auto", 2560, 1e-2) == torch.float32  # float32 error < 1 % of it
    assert choose(torch.float32, 10, None) == torch.float32
    with pytest.raises(ValueError, match="eigh_dtype"):
        vivitlib.LowRankGGN([nn.Parameter(torch.ones(2))], eigh_dtype="fast")
    # with rtol=1e-3 the auto choice gives the float64 eigenvalues to 1 % of the cut
    problem = make_problem(_BY_ID["cnn-ce"])
    blocks = []
    for dtype in ("auto", torch.float64):
        ggn = vivitlib.LowRankGGN(problem.params, rtol=1e-3, eigh_dtype=dtype)
        problem.run(ggn)
        blocks.append(ggn.blocks[0])
    auto, exact = blocks
    assert auto.num_directions == exact.num_directions
    tol = 0.01 * 1e-3 * float(exact.evals[0])
    assert (auto.evals - exact.evals).abs().max() <= tol


def test_matrix_free_products_on_an_extended_model_raise_no_hook_warning():
    problem = make_problem(_BY_ID["mlp-ce-mean"])  # BackPACK-extended model
    H = vivitlib.hessianfree.HessianOperator(
        problem.model, problem.loss_fn, [(problem.X, problem.y)]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert not [w for w in caught if "backward hook" in str(w.message)]


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
def test_broadcasting_targets_are_refused(loss_cls):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 1)).double())
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.rand(5, dtype=torch.float64).round()  # [N] against an [N, 1] output
    ggn = vivitlib.LowRankGGN(model.parameters())
    with pytest.raises(ValueError, match="(broadcasting mixes samples|same as input)"):
        _pass(ggn, model, extend(loss_cls()), X, y)


@pytest.mark.parametrize(
    "k, exc", [(-1, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_bad_number_of_eigenvectors(k, exc):
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    with pytest.raises(exc, match="k must be"):
        ggn.blocks[0].evecs(k)
    assert ggn.blocks[0].evecs(0)[0].shape[0] == 0


def test_a_second_forward_before_backward_is_refused():
    problem = make_problem(_BY_ID["mlp-ce-mean"])
    ggn = vivitlib.LowRankGGN(problem.params)
    with pytest.raises(ValueError, match="another forward pass ran"):
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            loss = problem.loss_fn(problem.model(problem.X), problem.y)
            problem.loss_fn(problem.model(problem.X.flip(0)), problem.y)
            loss.backward()
