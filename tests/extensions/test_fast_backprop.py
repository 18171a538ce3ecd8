"""Fast square-root-GGN backpropagation rules against stock BackPACK's."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import SqrtGGNExact
from torch import nn

import vivitlib
from vivitlib.extensions import fast_backprop

#: (module factory, input shape without batch); pools cover strides, paddings,
#: dilations, ceil_mode and non-overlapping windows.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

LAYERS = {
    "relu": (nn.ReLU, (3, 5, 4)),
    "sigmoid": (nn.Sigmoid, (7,)),
    "tanh": (nn.Tanh, (2, 6)),
    "leaky-relu": (lambda: nn.LeakyReLU(0.1), (3, 4, 4)),
    "elu": (nn.ELU, (5,)),
    "selu": (nn.SELU, (2, 3, 3)),
    "log-sigmoid": (nn.LogSigmoid, (6,)),
    "dropout-eval": (lambda: nn.Dropout(0.4).eval(), (3, 4)),
    "dropout-train": (lambda: nn.Dropout(0.4), (3, 4)),
    "maxpool1d": (lambda: nn.MaxPool1d(3, 2, padding=1), (2, 9)),
    "maxpool2d-disjoint": (lambda: nn.MaxPool2d(2), (3, 6, 4)),
    "maxpool2d-overlap-ceil": (lambda: nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                               (2, 8, 7)),
    "maxpool2d-dilated": (lambda: nn.MaxPool2d((3, 2), stride=(1, 2), padding=1,
                                               dilation=(2, 1)), (2, 7, 6)),
    "maxpool3d": (lambda: nn.MaxPool3d(2, stride=1, dilation=2, ceil_mode=True),
                  (1, 5, 5, 4)),
}  # fmt: skip


def _forward(name: str, N: int = 4):
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    module = extend(factory())
    x = torch.randn(N, *shape, dtype=torch.float64, requires_grad=True)
    with backpack():
        module(x)
    return module


def _stock(fast: type) -> type:
    """BackPACK's class the fast rule derives from."""
    return next(c for c in fast.__mro__ if c.__module__.startswith("backpack."))


@pytest.mark.parametrize("subsampling", [None, [3, 1]], ids=["all", "subsampled"])
@pytest.mark.parametrize("name", LAYERS)
def test_rule_equals_backpack(name, subsampling):
    module = _forward(name)
    stock = _stock(fast_backprop.FAST_DERIVATIVES[type(module)])
    n = module.output.shape[0] if subsampling is None else len(subsampling)
    mat = torch.randn(5, n, *module.output.shape[1:], dtype=torch.float64)
    with torch.no_grad():
        expected = stock().jac_t_mat_prod(
            module, None, None, mat, subsampling=subsampling
        )
    result = fast_backprop.jac_t_mat_prod(module, mat, subsampling)
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=1e-15, atol=0)


def test_dropout_eval_is_a_view_of_the_factor():
    module = _forward("dropout-eval")
    mat = torch.randn(2, *module.output.shape, dtype=torch.float64)
    assert fast_backprop.jac_t_mat_prod(module, mat) is mat


@contextmanager
def _rule_calls() -> Iterator[list[tuple[str, type]]]:
    """Record ``(method, type(self))`` of every derivative product called inside.

    Uses Python's profiler hook (no library attribute is replaced), so it sees
    which BackPACK derivatives a pass really runs.
    """
    calls: list[tuple[str, type]] = []
    names = {"_jac_t_mat_prod", "jac_t_mat_prod_"}

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name in names:
            owner = frame.f_locals.get("self")
            calls.append((frame.f_code.co_name, type(owner)))

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


def _stock_factor(model: nn.Module, loss_fn, X, y, params) -> torch.Tensor:
    """BackPACK's own V, ``[N·C, D]`` with sample-major rows."""
    with backpack(SqrtGGNExact()):
        loss_fn(model(X), y).backward()
    V = torch.cat([p.sqrt_ggn_exact.flatten(2) for p in params], dim=2)  # [C, N, D]
    return V.transpose(0, 1).flatten(end_dim=1)


def _shape_keeping_layer(shape: tuple[int, ...]) -> nn.Module:
    """A layer with parameters mapping ``shape`` to itself (1×1 convolution)."""
    if len(shape) == 1:
        return nn.Linear(shape[0], shape[0])
    conv = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}[len(shape)]
    return conv(shape[0], shape[0], 1)


@pytest.mark.parametrize("name", LAYERS)
def test_a_pass_runs_the_fast_rule_and_gives_backpacks_gram(name):
    """The factor extension backpropagates through the fast rule, same numbers."""
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = factory()
    features = layer(torch.zeros(1, *shape)).numel()
    # a first layer with parameters: the factor must reach it through ``layer``
    # (below the lowest parameter the factor extension stops)
    first = _shape_keeping_layer(shape)
    model = extend(
        nn.Sequential(first, layer, nn.Flatten(), nn.Linear(features, 3)).double()
    )
    loss_fn = extend(nn.CrossEntropyLoss())
    X = torch.randn(4, *shape, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    params = list(model.parameters())
    ggn = vivitlib.LowRankGGN(params, compute=("eigenvalues",))
    torch.manual_seed(1)  # the same dropout mask in both passes
    with _rule_calls() as calls, backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(model(X), y).backward()
    gram = ggn.blocks[0].gram
    fast = fast_backprop.FAST_DERIVATIVES[type(layer)]
    assert any(owner is fast for _, owner in calls), (name, calls)
    torch.manual_seed(1)
    V = _stock_factor(model, loss_fn, X, y, params)
    torch.testing.assert_close(gram, V @ V.T, rtol=1e-10, atol=1e-13)


class _Residual(nn.Module):
    """Sums whose branches share one backpropagated tensor (BackPACK's SumModule)."""

    def __init__(self):
        super().__init__()
        self.inp, self.a = nn.Linear(4, 5), nn.Linear(5, 5)
        self.b, self.out = nn.Linear(5, 5), nn.Linear(5, 3)
        self.relu1, self.relu2, self.tanh = nn.ReLU(), nn.ReLU(), nn.Tanh()

    def forward(self, x):
        h = self.inp(x)
        z = self.relu1(self.a(h)) + self.tanh(h)  # two parameter-free branches
        z = self.relu2(z) + self.b(z)  # an activation beside a parameter's output
        return self.out(z)


def _chain():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Tanh(), nn.Dropout(0.5).eval(), nn.Flatten(), nn.Linear(27, 6),
        nn.Sigmoid(), nn.Linear(6, 4), nn.LeakyReLU(0.2), nn.Linear(4, 3),
    )  # fmt: skip


NETWORKS = {
    "chain": (_chain, (5, 2, 6, 6), False),
    "residual": (_Residual, (6, 4), True),
}


@pytest.mark.parametrize("compute", [("eigenvalues",), ("eigenvectors",)])
@pytest.mark.parametrize("net", NETWORKS)
def test_network_factor_equals_stock_backpack(net, compute):
    """A whole pass through the fast rules (some in place) gives BackPACK's V."""
    factory, shape, converter = NETWORKS[net]
    torch.manual_seed(0)
    model = extend(factory().double(), use_converter=converter)
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    params = list(model.parameters())
    ggn = vivitlib.LowRankGGN(params, compute=compute)
    with _rule_calls() as calls, backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(model(X), y).backward()
    block = ggn.blocks[0]
    gram = block.gram
    lifted = "eigenvectors" in compute
    E = torch.cat([e.flatten(1) for e in block.evecs()], 1) if lifted else None
    V = _stock_factor(model, loss_fn, X, y, params)
    torch.testing.assert_close(gram, V @ V.T, rtol=1e-10, atol=1e-13)
    if E is not None:  # kept factors were not overwritten later in the pass
        G = V.T @ V
        tol = 1e-9 * block.evals[0]
        torch.testing.assert_close(E @ G, block.evals[:, None] * E, atol=tol, rtol=0)
    in_place = ("jac_t_mat_prod_", fast_backprop.FastReLUDerivatives)
    assert in_place in calls, "no activation was backpropagated in place"


def test_leftover_quantities_of_an_aborted_pass_are_dropped():
    """A quantity left under a memory address the next pass reuses is not added."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    reference = vivitlib.LowRankGGN(model.parameters(), compute=("eigenvalues",))
    with backpack(*reference.extensions, extension_hook=reference.hook):
        loss_fn(model(X), y).backward()
    expected = reference.blocks[0].evals
    ggn = vivitlib.LowRankGGN(model.parameters(), compute=("eigenvalues",))
    ledger = ggn.extensions[0].saved_quantities
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        out = model(X)
        stale = torch.ones(3, 6, 5, dtype=torch.float64)  # as if left behind
        ledger.save_quantity(model[1].output.data_ptr(), stale, torch.add)
        loss_fn(out, y).backward()
    assert len(ledger) == 0
    torch.testing.assert_close(ggn.blocks[0].evals, expected)
