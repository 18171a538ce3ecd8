"""Under ``max_memory``, the ``'pairwise'`` Gram plan forms a lazy factor by sample blocks.

A late convolution with few positions (3C3D's third) contracts input kernels
per pair of samples. When the factor reaching it is lazy, its weight's factor
is a :class:`~vivitlib.extensions.lazy_factor.SampleBlockedFactor`: the
pairwise kernel takes ``s`` a block of samples at a time from the lazy source
(:class:`~vivitlib.factors.pairwise.FactorBlocks`), the bias factor comes from
the same blocks and the input's factor stays lazy, so the output factor is
never formed whole. The numbers must not change (dense ``torch.func``
references, float64).
"""

import warnings

import pytest
import torch
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense, layerwise_results
from tests.reference import eigh_desc
from vivitlib.extensions import lazy_factor, lazy_layers
from vivitlib.extensions.lazy import LazyColumns, PendingOp
from vivitlib.factors import cost_model, kernels, pairwise
from vivitlib.memory import MemoryBudget, MemoryBudgetWarning, memory_budget

# ---------------------------------------------------------------- the kernel


def _operands(C=3, N=20, T=5, O=4, I=6, seed=0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(O, C, N, T, generator=gen, dtype=torch.float64)
    a = torch.randn(N, I, T, generator=gen, dtype=torch.float64)
    delta = torch.randn(N, T, O, generator=gen, dtype=torch.float64)
    return s.permute(1, 2, 3, 0), a.transpose(1, 2), delta  # BackPACK's strides


def _factor_blocks(s, taken):
    def take(n0, n1):
        taken.append((n0, n1))
        return s[:, n0:n1].clone()

    return pairwise.FactorBlocks(tuple(s.shape), take, like=s)


def _input_blocks(a, taken):
    def take(n0, n1):
        taken.append((n0, n1))
        return a[n0:n1].clone()

    return kernels.InputBlocks(tuple(a.shape), take, 2, like=a)


def _gram(s, a, delta, chunk):
    return pairwise.pairwise_gram(
        s, a, delta, chunk_elements=chunk, workspace_elements=chunk
    )


#: Chunk budgets (entries) and the samples per block they give (None: all at once).
CHUNKS = {"block-1": (300, 1), "block-2": (600, 2), "block-3": (1000, 3),
          "whole": (10**6, None)}  # fmt: skip


@pytest.mark.parametrize("given", ["s", "a", "both"])
@pytest.mark.parametrize("with_delta", [False, True], ids=["gram", "gram+vtg"])
@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
def test_pairwise_gram_with_operands_given_by_blocks(given, with_delta, chunk):
    chunk, block = chunk
    assert pairwise._blocks(20, 5, 5 * (4 * (3 + with_delta) + 6), chunk)[0] == block
    s, a, delta = _operands()
    delta = delta if with_delta else None
    taken_s, taken_a = [], []
    s_in = _factor_blocks(s, taken_s) if given in ("s", "both") else s
    a_in = _input_blocks(a, taken_a) if given in ("a", "both") else a
    gram, vtg = _gram(s_in, a_in, delta, chunk)
    ref_gram, ref_vtg = _gram(s, a, delta, chunk)
    torch.testing.assert_close(gram, ref_gram, rtol=0, atol=1e-12)
    # and against V formed densely
    v = torch.einsum("cnto,nti->cnoi", s, a).flatten(2)
    flat = v.reshape(-1, v.shape[-1])
    torch.testing.assert_close(gram.reshape(flat.shape[0], -1), flat @ flat.T)
    if with_delta:
        g = torch.einsum("nto,nti->noi", delta, a).flatten(1)
        torch.testing.assert_close(vtg, ref_vtg, rtol=0, atol=1e-12)
        torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    else:
        assert vtg is None and ref_vtg is None
    for taken in (taken_s, taken_a):
        if taken:
            # never more samples than a block (all of them once without blocks)
            most = max(n1 - n0 for n0, n1 in taken)
            assert most == (20 if block is None else block)
            assert (len(taken) == 1) == (block is None)


def test_factor_blocks_describe_the_factor():
    s, _, _ = _operands(N=4)
    blocks = _factor_blocks(s, [])
    assert blocks.shape == tuple(s.shape)
    assert blocks.dtype == s.dtype and blocks.device == s.device
    assert blocks.new_empty(2, 3).shape == (2, 3)


def _shrinking_lazy(C=8, N=5, seed=0):
    """A lazy ``[C, N, 2, 3, 3]`` whose source ``[C, N, 8, 3, 3]`` is 4× larger.

    Its map keeps the first two channels, doubled; per sample, forming a
    column takes more memory than the column itself.
    """
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(C, N, 8, 3, 3, generator=gen, dtype=torch.float64)

    def fn(x, fresh):
        return 2 * x[:, :, :2]

    op = PendingOp(fn, (N, 2, 3, 3), True, samples=lambda n0, n1: fn)
    return LazyColumns(source, (op,))


@pytest.mark.parametrize("budget", [1, 10**6])
def test_sample_blocked_factor_blocks_equal_the_formed_factor(budget):
    """Blocks formed in column chunks (a tiny budget) or whole columns."""
    lazy = _shrinking_lazy()
    C, N = lazy.shape[:2]
    a = torch.randn(N, 9, 7, dtype=torch.float64)
    factor = lazy_factor.SampleBlockedFactor(lazy, a)
    s = lazy.materialise().reshape(C, N, 2, 9).transpose(2, 3)
    with memory_budget(MemoryBudget.split(budget)):
        blocks = factor.blocks()
        assert blocks.shape == (C, N, 9, 2)
        for n0, n1 in ((0, 1), (1, 4), (0, N)):
            torch.testing.assert_close(blocks.take(n0, n1), s[:, n0:n1], rtol=0, atol=0)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-input", "other-input"])
def test_sample_blocked_contraction_equals_the_formed_factors(shared):
    """Gram and ``Vᵀ g``: through blocks (shared input: ``Δ`` as a column) or
    with ``s`` formed (gradients of another input), as the formed factor."""
    from vivitlib.factors import outer_factor
    from vivitlib.factors.outer import OuterGrads

    lazy = _shrinking_lazy()
    C, N = lazy.shape[:2]
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(N, 9, 7, generator=gen, dtype=torch.float64)
    if shared:  # the gradients of the factor's samples and layer input
        grads = OuterGrads(torch.randn(N, 9, 2, generator=gen).double(), a, "layer")
    else:
        delta = torch.randn(3, 9, 2, generator=gen, dtype=torch.float64)
        grads = OuterGrads(delta, torch.randn(3, 9, 7, generator=gen).double(), "x")
    s = lazy.materialise().reshape(C, N, 2, 9).transpose(2, 3)
    with cost_model(gram_plan="pairwise"), memory_budget(MemoryBudget.split(3000)):
        factor = lazy_factor.SampleBlockedFactor(lazy, a, "layer")
        gram, vtg, kept = factor.contract(grads)
        ref_gram, ref_vtg, _ = outer_factor(s, a, "layer").contract(grads)
    assert kept is None
    # s formed only for the gradients of another input
    assert (factor._formed is None) == shared
    torch.testing.assert_close(gram, ref_gram, rtol=0, atol=1e-12)
    torch.testing.assert_close(vtg, ref_vtg, rtol=0, atol=1e-12)
    v = torch.einsum("cnto,nti->cnoi", s, a).flatten(2)
    g = torch.einsum("nto,nti->noi", grads.delta, grads.a).flatten(1)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))


# ------------------------------------------------------------- whole passes


def _late_conv_net():
    """Two late convolutions whose dense ``V`` outweighs their output factors."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(5, 3),
    ).eval()  # fmt: skip


#: per-column output features of the two late convolutions
LATE_OUTPUTS = {(6, 4, 4), (5, 3, 3)}

LOSSES = {
    "ce": dict(loss=nn.CrossEntropyLoss, y=lambda n: torch.randint(0, 3, (n,))),
    "mse": dict(loss=nn.MSELoss, y=lambda n: torch.randn(n, 3)),
}


def _problem(loss="ce", n=5):
    return make_problem(dict(model=_late_conv_net, x=(n, 2, 8, 8), **LOSSES[loss]))


def _quiet_run(problem, collector):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        with cost_model(gram_plan="pairwise"):
            problem.run(collector)
    return collector


class _Spy:
    """Records the sample-blocked factors made and what was formed of the late
    convolutions' output factors (whole: ``materialise``; columns × samples)."""

    def __init__(self, monkeypatch):
        self.made, self.materialised, self.formed = [], [], []
        real_init = lazy_factor.SampleBlockedFactor.__init__
        real_materialise = LazyColumns.materialise
        real_columns = LazyColumns.columns

        def init(factor, *args, **kwargs):
            self.made.append(factor)
            real_init(factor, *args, **kwargs)

        def materialise(lazy):
            if tuple(lazy.shape[2:]) in LATE_OUTPUTS:
                self.materialised.append(tuple(lazy.shape))
            return real_materialise(lazy)

        def columns(lazy, c0, c1, samples=None):
            if tuple(lazy.shape[2:]) in LATE_OUTPUTS:
                n = lazy.shape[1] if samples is None else samples[1] - samples[0]
                self.formed.append((c1 - c0) * n / (lazy.shape[0] * lazy.shape[1]))
            return real_columns(lazy, c0, c1, samples)

        monkeypatch.setattr(lazy_factor.SampleBlockedFactor, "__init__", init)
        monkeypatch.setattr(LazyColumns, "materialise", materialise)
        monkeypatch.setattr(LazyColumns, "columns", columns)


def _assert_eigenvalues(block, ggn):
    evals = eigh_desc(ggn)[0]
    K = block.num_directions
    assert (evals[K:].abs() <= 1e-8 * evals[0]).all()
    torch.testing.assert_close(block.evals, evals[:K], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("budget", [1, 3000])
@pytest.mark.parametrize("loss", LOSSES)
def test_eigenvalues_never_form_the_late_output_factors(monkeypatch, loss, budget):
    problem = _problem(loss)
    spy = _Spy(monkeypatch)
    ggn = vivitlib.LowRankGGN(problem.params, compute="eigenvalues", max_memory=budget)
    (block,) = _quiet_run(problem, ggn).blocks
    _assert_eigenvalues(block, problem.dense().ggn)
    assert len(spy.made) == 2  # both late convolutions
    assert not spy.materialised
    assert spy.formed and max(spy.formed) < 1


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "compute",
    [vivitlib.QUANTITIES, ("eigenvalues", "directional_derivatives", "newton_step")],
    ids=["all", "newton-only"],
)
def test_budgeted_pass_matches_dense(monkeypatch, loss, compute):
    """Lifting keeps the factors (``s`` formed once, then the usual factor)."""
    problem = _problem(loss)
    spy = _Spy(monkeypatch)
    ggn = vivitlib.LowRankGGN(problem.params, compute=compute, max_memory=1)
    (block,) = _quiet_run(problem, ggn).blocks
    assert len(spy.made) == 2
    if "eigenvectors" in compute:
        assert_block_matches_dense(block, problem.dense())
        return
    reference = vivitlib.LowRankGGN(problem.params, compute=compute)
    (ref,) = _quiet_run(problem, reference).blocks
    for key in ("evals", "gammas", "lambdas"):
        torch.testing.assert_close(
            getattr(block, key), getattr(ref, key), rtol=1e-9, atol=1e-12
        )
    # the Newton step against the dense GGN (the same in any eigenbasis)
    dense = problem.dense()
    evals, evecs = eigh_desc(dense.ggn)
    _assert_eigenvalues(block, dense.ggn)
    E = evecs[:, : block.num_directions].T
    for damping in (1e-3, 1.0):
        step = torch.cat([s.flatten() for s in block.newton_step(damping)])
        expected = -E.T @ ((E @ dense.grad) / (evals[: E.shape[0]] + damping))
        tol = 1e-9 * expected.abs().max()
        torch.testing.assert_close(step, expected, rtol=1e-6, atol=tol)


def _results(**kwargs):
    run = lambda problem, ggn: _quiet_run(problem, ggn).blocks  # noqa: E731
    return layerwise_results(_problem(n=6), run, **kwargs)


@pytest.mark.parametrize(
    "options",
    [
        dict(subsampling=[4, 0, 2]),
        dict(mc_samples=2, subsampling=[3, 0, 2], grad_subsampling=[1, 2]),
    ],
    ids=["subsampled", "mc-subsampled"],
)
def test_monte_carlo_and_subsampling_unchanged_by_budget(monkeypatch, options):
    reference = _results(**options)
    spy = _Spy(monkeypatch)
    budgeted = _results(max_memory=1, **options)
    assert spy.made
    for ref, got in zip(reference, budgeted, strict=True):
        evecs_ref, evecs = ref[3], got[3]
        evecs = evecs * torch.sign((evecs_ref * evecs).sum(1, keepdim=True))
        for a, b in zip((*ref[:3], evecs_ref), (*got[:3], evecs)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_directional_derivatives_match_dense(monkeypatch):
    problem = _problem("mse")
    gen = torch.Generator().manual_seed(0)
    directions = [torch.randn(3, *p.shape, generator=gen, dtype=p.dtype)
                  for p in problem.params]  # fmt: skip
    spy = _Spy(monkeypatch)
    dd = vivitlib.DirectionalDerivatives(problem.params, directions, max_memory=1)
    _quiet_run(problem, dd)
    assert len(spy.made) == 2
    dense = problem.dense()
    D = torch.cat([d.flatten(1) for d in directions], dim=1)
    lambdas = torch.einsum("kd,nde,ke->nk", D, dense.per_sample_ggn, D)
    torch.testing.assert_close(dd.gammas, dense.per_sample_grads @ D.T)
    torch.testing.assert_close(dd.lambdas, lambdas)


# ------------------------------------------------------------------ the plan


def _lazy_at_third_conv(problem):
    """The factor reaching the third convolution, kept lazy (a stand-in)."""
    C, N = 3, problem.X.shape[0]
    source = torch.randn(C, N, 5, 3, 3, dtype=torch.float64)
    return LazyColumns(source)


def test_samples_plan_only_under_a_budget():
    problem = _problem()
    conv = problem.model[6]
    lazy = _lazy_at_third_conv(problem)
    with cost_model(gram_plan="pairwise"):
        assert lazy_layers.lazy_plan(conv, lazy, True) is None
        with memory_budget(MemoryBudget.split(1000)):
            assert lazy_layers.lazy_plan(conv, lazy, True) == "samples"
            assert lazy_layers.lazy_plan(conv, lazy, False) is None
    with cost_model(gram_plan="dense"), memory_budget(MemoryBudget.split(1000)):
        assert lazy_layers.lazy_plan(conv, lazy, True) != "samples"


def test_a_budget_below_the_sample_steps_needs_warns():
    """What the step cannot split (unfolded input block, lazy source) is named."""
    problem = _problem()
    ggn = vivitlib.LowRankGGN(problem.params, compute="eigenvalues", max_memory=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemoryBudgetWarning)
        with cost_model(gram_plan="pairwise"):
            problem.run(ggn)
    messages = [str(w.message) for w in caught]
    assert any("Conv2d (its unfolded input and the lazy source)" in m for m in messages)
    _assert_eigenvalues(ggn.blocks[0], problem.dense().ggn)
