"""Every layer kind and contraction plan against the dense float64 reference.

Checks Gram matrix (eigenvalues), lifted eigenvectors, per-sample directional
derivatives γ and λ and the damped Newton step, for each way a layer's share
can be computed: the Gram plans of :class:`vivitlib.factors.CostModel` forced
in turn, and BackPACK's dense factor (``factored=False``).
"""

import warnings

import pytest
import torch
from torch import nn

import vivitlib
from tests.core.cases import Problem, make_problem
from tests.core.helpers import assert_block_matches_dense, flat_evecs, spy_unfolding
from vivitlib.extensions import layers
from vivitlib.factors import cost_model
from vivitlib.memory import MemoryBudgetWarning


def _head(features: int, model: nn.Module) -> nn.Module:
    return nn.Sequential(model, nn.Sigmoid(), nn.Flatten(), nn.Linear(features, 3))


LAYER_CASES = {
    "linear": (lambda: _head(4, nn.Linear(5, 4)), (5, 5)),
    "linear-sequence": (lambda: _head(8, nn.Linear(3, 4)), (4, 2, 3)),
    "conv1d": (lambda: _head(9, nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2)),
               (4, 2, 7)),
    "conv2d": (lambda: _head(12, nn.Conv2d(2, 2, 3, stride=(2, 1), padding=1,
                                          dilation=(1, 2))), (3, 2, 4, 5)),
    "conv3d": (lambda: _head(16, nn.Conv3d(1, 1, 2, padding=(1, 0, 0))), (3, 1, 3, 3, 3)),
    "conv2d-groups": (lambda: _head(8, nn.Conv2d(2, 2, 2, groups=2)), (3, 2, 3, 3)),
    "convtranspose2d": (lambda: _head(18, nn.ConvTranspose2d(2, 2, 2)), (3, 2, 2, 2)),
}  # fmt: skip
ROUTES = ("dense", "pairwise", "backpack")


@pytest.fixture(params=LAYER_CASES, ids=list(LAYER_CASES))
def layer_problem(request):
    model, shape = LAYER_CASES[request.param]
    case = dict(model=model, loss=nn.CrossEntropyLoss, x=shape,
                y=lambda n: torch.randint(0, 3, (n,)))  # fmt: skip
    return make_problem(case)


@pytest.fixture(params=ROUTES)
def route(request):
    """Every computation of the test takes ``route`` (in several kernel chunks)."""
    if request.param == "backpack":
        settings = dict(factored=False, chunk_elements=50)
    else:
        settings = dict(
            gram_plan=request.param, chunk_elements=50, materialise_elements=50
        )
    with cost_model(**settings):
        yield request.param


def test_all_quantities_match_dense(layer_problem, route):
    problem = layer_problem
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block, dense = ggn.blocks[0], problem.dense()
    torch.testing.assert_close(
        block.gram.trace(), dense.ggn.trace(), rtol=1e-10, atol=0
    )
    assert_block_matches_dense(block, dense)


def test_grad_subsampling_and_layerwise(layer_problem, route):
    """Different curvature and gradient samples, one group per layer."""
    problem = layer_problem
    groups = vivitlib.layerwise_groups(problem.model)
    ggn = vivitlib.LowRankGGN(groups, subsampling=[0, 2], grad_subsampling=[1, 2])
    problem.run(ggn)
    for group, block in zip(groups, ggn.blocks):
        E = flat_evecs(block)
        dense_g = problem.dense(group["params"]).per_sample_grads
        torch.testing.assert_close(
            block.gammas, dense_g[[1, 2]] @ E.T, atol=1e-9, rtol=1e-7
        )


def test_conv_input_unfolded_once_per_visit(monkeypatch):
    """Factor and per-sample gradients share one unfolded input, never a stale one."""
    from backpack import backpack, extend

    original = layers.unfold_input
    calls = spy_unfolding(monkeypatch)
    conv = extend(nn.Conv2d(2, 3, 3))
    x = torch.randn(4, 2, 5, 5, requires_grad=True)
    with backpack():
        conv(x)
    first = layers.conv_inputs(conv, None)
    assert layers.conv_inputs(conv, None) is first and calls == [4]
    assert layers.conv_inputs(conv, [0, 2]).shape[0] == 2 and calls == [4, 2]
    x2 = torch.randn(4, 2, 5, 5, requires_grad=True)
    with backpack():
        conv(x2)
    second = layers.conv_inputs(conv, None)
    assert second is not first and calls == [4, 2, 4]
    torch.testing.assert_close(second, original(conv, x2.detach()).transpose(1, 2))
    # a full pass with factors and gradients unfolds each convolution once
    calls.clear()
    model = extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(27, 2)))  # fmt: skip
    loss_fn = extend(nn.CrossEntropyLoss())
    ggn = vivitlib.LowRankGGN(model.parameters())
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(model(torch.randn(3, 2, 5, 5)), torch.tensor([0, 1, 1])).backward()
    assert calls == [3]


@pytest.mark.parametrize("grad_subsampling", [None, [2, 0]])
def test_input_handed_over_to_the_gradients(monkeypatch, grad_subsampling):
    """A weight factor formed dense keeps no input: the gradients get it anyway.

    Behind max pooling the factor at the convolution is lazy (under this
    budget), so the weight's factor is formed dense from column chunks and
    the factor step drops the unfolded input; it is handed over to the
    per-sample gradients, not unfolded again. Gradients of other samples
    unfold their own (the held input is released, not reused).
    """
    from backpack import extend

    torch.manual_seed(0)
    model = extend(nn.Sequential(
        nn.Conv2d(1, 4, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    ).double())  # fmt: skip
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(4, 1, 9, 9, dtype=torch.float64), torch.arange(4)
    problem = Problem(model, loss_fn, X, y)
    calls = spy_unfolding(monkeypatch)
    held = []  # what was held whenever an input was unfolded
    real = layers.unfold_input
    monkeypatch.setattr(layers, "unfold_input", lambda module, x: (
        held.append(len(layers._HANDED_OVER)), real(module, x))[1])  # fmt: skip
    ggn = vivitlib.LowRankGGN(
        problem.params, max_memory=160_000, grad_subsampling=grad_subsampling
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        problem.run(ggn)
    whole = [n for n in calls if n > 1]  # (a budget probes shapes on one sample)
    assert whole == ([4] if grad_subsampling is None else [4, 2])
    # other samples: nothing handed over, the factor's input is not held
    assert not any(held)
    assert layers._HANDED_OVER == []
    block, dense = ggn.blocks[0], problem.dense()
    if grad_subsampling is None:
        assert_block_matches_dense(block, dense)
    else:
        E = flat_evecs(block)
        torch.testing.assert_close(
            block.gammas, dense.per_sample_grads[grad_subsampling] @ E.T,
            atol=1e-9, rtol=1e-7,
        )  # fmt: skip


def test_nothing_held_after_a_failure_in_the_gradients(monkeypatch):
    """An error between hand-over and take-over leaves nothing held."""
    from backpack import extend

    from vivitlib.extensions.backpack_ext import FACTORED_GRADS

    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Conv2d(1, 3, 2), nn.Flatten(), nn.Linear(48, 3)))
    problem = Problem(model, extend(nn.CrossEntropyLoss()),
                      torch.randn(4, 1, 5, 5), torch.arange(4) % 3)  # fmt: skip
    for p in problem.params:
        p.grad = torch.ones_like(p)

    def fail(*args, **kwargs):
        assert layers._HANDED_OVER, "nothing was handed over: the test tests nothing"
        raise MemoryError("simulated: out of memory in the gradients' bias step")

    monkeypatch.setattr(FACTORED_GRADS[nn.Conv2d], "bias", fail, raising=False)
    with pytest.raises(MemoryError, match="simulated"):
        problem.run(vivitlib.LowRankGGN(problem.params))
    assert layers._HANDED_OVER == []
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in problem.params)
