"""Under a small ``max_memory`` a convolution's unfolded input is never formed whole.

The unfolded input is ``kernel size`` times the layer's input (DeepOBS 2C2D's
second convolution: 38 MiB at ``N = 64``), so a budget that it exceeds gets it
a block of samples at a time (:class:`vivitlib.factors.kernels.InputBlocks`):
the Gram kernels and the lazy layer steps take the blocks in turn. The numbers
must not change, and no whole unfolded input may be formed.
"""

import warnings

import pytest
import torch
from torch import nn

import vivitlib
from tests.core.cases import make_problem
from tests.core.helpers import assert_block_matches_dense, spy_unfolding
from tests.reference import eigh_desc
from vivitlib.extensions import layers
from vivitlib.factors import kernels
from vivitlib.memory import MemoryBudgetWarning


def _strided(C=3, N=7, T=5, O=4, I=6, seed=0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(O, C, N, T, generator=gen, dtype=torch.float64)
    a = torch.randn(N, I, T, generator=gen, dtype=torch.float64)
    return s.permute(1, 2, 3, 0), a.transpose(1, 2)  # BackPACK's strides


def _blocks(a, step, taken):
    def take(n0, n1):
        taken.append((n0, n1))
        return a[n0:n1].clone()

    return kernels.InputBlocks(tuple(a.shape), take, step, like=a)


@pytest.mark.parametrize("per_class", [True, False], ids=["per-class", "per-sample"])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_dense_plan_takes_the_input_block_by_block(monkeypatch, per_class, step):
    monkeypatch.setattr(kernels, "_per_class", lambda *args: per_class)
    s, a = _strided()
    delta = torch.randn(7, 5, 4, dtype=torch.float64)
    g = torch.einsum("nto,nti->noi", delta, a).flatten(1)
    v = torch.einsum("cnto,nti->cnoi", s, a).flatten(2)
    taken = []
    gram, vtg = kernels.dense_plan_gram(
        s,
        _blocks(a, step, taken),
        lambda o0, o1: kernels.grads_dense(delta[..., o0:o1], a),
        chunk_elements=3 * 7 * (6 + 5) * 2,  # two outputs per slice
    )
    flat = v.reshape(-1, v.shape[-1])
    torch.testing.assert_close(gram.reshape(flat.shape[0], -1), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    # every slice took every block once, never more than `step` samples
    slices = 2
    assert len(taken) == slices * -(-7 // step)
    assert max(n1 - n0 for n0, n1 in taken) == min(step, 7)


def test_input_blocks_cover_all_samples_and_form_the_whole():
    _, a = _strided(N=10)
    taken = []
    blocks = _blocks(a, 4, taken)
    got = [(n0, n1) for n0, n1, _ in blocks.blocks()]
    assert got == [(0, 4), (4, 8), (8, 10)]
    torch.testing.assert_close(kernels.whole_input(blocks), a)
    assert blocks.numel() == a.numel() and blocks.dtype == a.dtype
    assert kernels.whole_input(a) is a


def _conv_net():
    """Two convolutions with large kernels (their unfolded inputs dominate)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(36, 3),
    ).eval()  # fmt: skip


CASE = dict(
    model=_conv_net,
    loss=nn.CrossEntropyLoss,
    x=(6, 2, 8, 12),
    y=lambda n: torch.randint(0, 3, (n,)),
)


@pytest.mark.parametrize("plan", ["columns", "channels"])
@pytest.mark.parametrize("compute", ["eigenvalues", "all"])
def test_budgeted_pass_unfolds_blocks_and_matches_dense(monkeypatch, plan, compute):
    """Both lazy steps (``'columns'``: the first convolution, ``'channels'``: the
    second, forced) read blocks only, and the results equal the dense GGN's."""
    from vivitlib.extensions import lazy_layers

    if plan == "channels":
        real_plan = lazy_layers.lazy_plan

        def channels(module, quantity, unfoldable, wants=None):
            got = real_plan(module, quantity, unfoldable)
            return "channels" if got == "columns" and quantity.narrowable else got

        monkeypatch.setattr("vivitlib.extensions.backpack_ext.lazy_plan", channels)
    formed = _assert_budgeted_pass(monkeypatch, CASE, 2000, compute)
    if compute != "eigenvalues":
        # lifting keeps the factors, whole unfolded inputs included
        assert min(formed) < 6


def _assert_budgeted_pass(monkeypatch, case, budget, compute) -> list[int]:
    """Run ``case`` (6 samples) under ``budget``, check it against dense.

    For eigenvalues alone, only blocks of samples may be unfolded. Returns the
    samples of every unfolded input formed.
    """
    formed = spy_unfolding(monkeypatch)
    problem = make_problem(case)
    options = {"compute": "eigenvalues"} if compute == "eigenvalues" else {}
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=budget, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        problem.run(ggn)
    (block,) = ggn.blocks
    if compute == "eigenvalues":
        _assert_eigenvalues(block, problem.dense().ggn)
        # blocks of samples only: no whole unfolded input of the 6 samples
        assert formed and max(formed) < 6
    else:
        assert_block_matches_dense(block, problem.dense())
    return formed


def _assert_eigenvalues(block, ggn):
    evals = eigh_desc(ggn)[0]
    K = block.num_directions
    assert (evals[K:].abs() <= 1e-8 * evals[0]).all()
    torch.testing.assert_close(block.evals, evals[:K], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("subsampling", [None, [4, 0, 2]])
def test_unfolded_input_whole_without_a_budget_else_in_blocks(subsampling):
    from vivitlib.memory import MemoryBudget, memory_budget

    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    conv.input0 = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    whole = layers.conv_inputs(conv, subsampling)
    got = layers.conv_input_blocks(conv, subsampling)
    assert isinstance(got, torch.Tensor)
    # 18 x 16 entries of 8 bytes per sample; an eighth of 8000 bytes holds 0.4
    with memory_budget(MemoryBudget.split(8000)):
        got = layers.conv_input_blocks(conv, subsampling)
    assert isinstance(got, kernels.InputBlocks)
    assert got.step == 1 and got.shape == tuple(whole.shape)
    torch.testing.assert_close(got.whole(), whole)
    # a budget the whole input fits keeps it whole
    with memory_budget(MemoryBudget.split(10**6)):
        assert isinstance(layers.conv_input_blocks(conv, subsampling), torch.Tensor)


@pytest.mark.parametrize(
    "compute",
    [("eigenvalues",), ("eigenvalues", "directional_derivatives"), vivitlib.QUANTITIES],
)
def test_whole_inputs_under_a_budget_are_reported(compute):
    """Per-sample gradients still read a convolution's unfolded input whole
    under a budget and say so in a MemoryBudgetWarning; the eigenvalue pass
    does not need them."""
    problem = make_problem(CASE)
    ggn = vivitlib.LowRankGGN(problem.params, compute=compute, max_memory=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemoryBudgetWarning)
        problem.run(ggn)
    messages = " ".join(str(w.message) for w in caught)
    grads = "directional_derivatives" in compute or "newton_step" in compute
    assert ("Conv2d (per-sample gradients" in messages) == grads, messages
    if "eigenvectors" in compute:
        assert_block_matches_dense(ggn.blocks[0], problem.dense())


def _strided_dilated_net():
    """Stride, dilation and batch norm ahead of blocked unfolded inputs."""
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=2, dilation=2), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(45, 3),
    )  # fmt: skip
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("compute", ["eigenvalues", "all"])
@pytest.mark.parametrize("budget", [1, 2000])
def test_strided_dilated_blocks_match_dense(monkeypatch, compute, budget):
    case = dict(CASE, model=_strided_dilated_net, x=(6, 2, 12, 12))
    _assert_budgeted_pass(monkeypatch, case, budget, compute)
