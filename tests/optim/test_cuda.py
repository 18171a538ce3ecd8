"""The Newton optimisers on a CUDA device agree with the CPU (skipped without one)."""

import copy

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from tests.optim.helpers import make_closure
from vivitlib.optim import BootstrapDamping, DampedNewton, LanczosDampedNewton

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def problem(device, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    X = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    return (extend(net.to(device)), extend(nn.CrossEntropyLoss()), X.to(device),
            y.to(device))  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {"damping": 0.1, "mc_samples": 0},
        {"damping": 0.1, "mc_samples": 0, "complement_lr": 0.3},
        {"damping": "bootstrap", "mc_samples": 0},
        {"damping": "independent", "mc_samples": 0},
    ],
)
def test_cuda_steps_match_cpu(options):
    params = {}
    for device in ("cpu", "cuda"):
        model, loss_fn, X, y = problem(device)
        kwargs = dict(options)
        if kwargs["damping"] == "bootstrap":
            kwargs["damping"] = BootstrapDamping(generator=0)
        elif kwargs["damping"] == "independent":
            kwargs["damping"] = BootstrapDamping(generator=0, independent=True)
        opt = DampedNewton(model.parameters(), **kwargs)
        for _ in range(3):
            opt.step(make_closure(opt, model, loss_fn, X, y))
        params[device] = torch.cat(
            [p.detach().cpu().flatten() for p in model.parameters()]
        )
    torch.testing.assert_close(params["cuda"], params["cpu"], rtol=1e-6, atol=1e-9)


def test_cuda_defaults_without_closure_and_lanczos():
    model, loss_fn, X, y = problem("cuda")
    start = loss_fn(model(X), y).item()
    opt = DampedNewton(model.parameters())
    for _ in range(10):
        opt.zero_grad()
        with backpack(*opt.extensions, extension_hook=opt.hook):
            loss_fn(model(X), y).backward()
        opt.step()
    assert loss_fn(model(X), y).item() < start
    state = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(state)
    lanczos = LanczosDampedNewton(model, loss_fn, (X, y), k=3, refresh_every=2)
    for _ in range(4):
        lanczos.step(make_closure(lanczos, model, loss_fn, X, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())
