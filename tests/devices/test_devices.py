"""The core computations on every available device (CPU always, CUDA if present).

Each test builds its problem on the CPU, computes the independent float64 dense
reference there (:mod:`tests.reference`), moves model and data to the device
and checks the library's results on that device with the tolerances of the
CPU-only tests. ``pytest tests/devices`` is what a GPU machine runs.
"""

import pytest
import torch
from backpack import backpack

import vivitlib
from tests.core.cases import CASES, Problem, make_problem
from tests.core.helpers import assert_block_matches_dense
from tests.hessianfree import cases as hf_cases
from vivitlib import hessianfree as hf
from vivitlib.factors import cost_model
from vivitlib.optim import ConstantDamping, DampedNewton

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: Cases covering linear, convolution (+ max-pool), sequence and residual layers.
CASE_IDS = ("mlp-ce-sum", "cnn-ce", "seq-linear-mse", "conv1d-mse",
            "resnet-converter-ce")  # fmt: skip
#: Both contraction plans of weight-shared layers.
PLANS = ("dense", "pairwise")


def _case(case_id: str) -> dict:
    return next(c for c in CASES if c["id"] == case_id)


def _to(problem: Problem, device: str) -> Problem:
    return Problem(problem.model.to(device), problem.loss_fn.to(device),
                   problem.X.to(device), problem.y.to(device))  # fmt: skip


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=PLANS)
def plan(request):
    """Every computation of the test takes ``plan`` (in several kernel chunks)."""
    with cost_model(
        gram_plan=request.param, chunk_elements=50, materialise_elements=50
    ):
        yield request.param


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_low_rank_ggn(device, case_id, plan):
    """Eigenpairs, γ, λ and the Newton step against the dense reference."""
    problem = make_problem(_case(case_id))
    dense = problem.dense()
    problem = _to(problem, device)
    ggn = vivitlib.LowRankGGN(problem.params)
    problem.run(ggn)
    block = _OnCpu(ggn.blocks[0])
    assert ggn.blocks[0].evals.device.type == device
    assert_block_matches_dense(block, dense)


@pytest.mark.parametrize("name", ["conv-bn-pool", "conv-bn-conv"])
def test_lazy_batch_norm(device, name):
    """Batch norm taking lazy factors (a tiny budget) against the dense reference."""
    import warnings

    from tests.extensions.test_batch_norm import NETS
    from vivitlib.memory import MemoryBudgetWarning

    problem = make_problem(NETS[name])
    dense = problem.dense()
    problem = _to(problem, device)
    ggn = vivitlib.LowRankGGN(problem.params, max_memory=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        problem.run(ggn)
    assert ggn.blocks[0].evals.device.type == device
    assert_block_matches_dense(_OnCpu(ggn.blocks[0]), dense)


class _OnCpu:
    """A block's results copied to the CPU, for the CPU-side reference checks."""

    def __init__(self, block):
        self._block = block
        self.num_directions = block.num_directions
        self.evals = block.evals.cpu()
        self.gammas = block.gammas.cpu()
        self.lambdas = block.lambdas.cpu()

    def evecs(self, k=None):
        return [e.cpu() for e in self._block.evecs(k)]

    def newton_step(self, damping):
        return [s.cpu() for s in self._block.newton_step(damping)]


@pytest.mark.parametrize("case_id", ("cnn-ce", "seq-linear-mse"))
def test_directional_derivatives(device, case_id):
    problem = make_problem(_case(case_id))
    dense = problem.dense()
    gen = torch.Generator().manual_seed(1)
    directions = [torch.randn(3, *p.shape, generator=gen, dtype=p.dtype)
                  for p in problem.params]  # fmt: skip
    D = torch.cat([d.flatten(1) for d in directions], dim=1)
    gammas = dense.per_sample_grads @ D.T
    lambdas = torch.einsum("kd,nde,ke->nk", D, dense.per_sample_ggn, D)
    problem = _to(problem, device)
    dd = vivitlib.DirectionalDerivatives(
        problem.params, [d.to(device) for d in directions]
    )
    problem.run(dd)
    assert dd.gammas.device.type == device
    tol = 1e-9 * gammas.abs().max()
    torch.testing.assert_close(dd.gammas.cpu(), gammas, atol=tol, rtol=1e-7)
    tol = 1e-9 * lambdas.abs().max()
    torch.testing.assert_close(dd.lambdas.cpu(), lambdas, atol=tol, rtol=1e-7)


def test_hessianfree_product_and_topk(device):
    problem = hf_cases.make_problem(hf_cases.CASES[0])
    dense = hf_cases.DENSE["hessian"](problem)
    model, loss_fn = problem.model.to(device), problem.loss_fn.to(device)
    batches = [(X.to(device), y.to(device)) for X, y in problem.batches]
    op = hf.HessianOperator(model, loss_fn, batches)
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=_gen())
    torch.testing.assert_close((op @ v.to(device)).cpu(), dense @ v,
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    res = hf.topk_eigh(op, 3, tol=1e-8, generator=_gen())
    assert res.converged
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
    torch.testing.assert_close(res.evals.cpu(), exact, rtol=1e-7, atol=1e-10)
    V = res.flat_evecs.cpu()
    torch.testing.assert_close(dense @ V, V * exact, atol=1e-5, rtol=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _newton_step(device: str) -> list[torch.Tensor]:
    problem = _to(make_problem(_case("cnn-ce")), device)
    opt = DampedNewton(problem.params, damping=ConstantDamping(0.3), mc_samples=0)
    before = [p.detach().clone() for p in problem.params]
    opt.zero_grad()
    with backpack(*opt.extensions, extension_hook=opt.hook):
        problem.loss_fn(problem.model(problem.X), problem.y).backward()
    opt.step()
    return [(p.detach() - b).cpu() for p, b in zip(problem.params, before)]


def test_damped_newton_step(device):
    """One step on the device equals the same step on the CPU (float64)."""
    steps, reference = _newton_step(device), _newton_step("cpu")
    assert any(s.abs().max() > 0 for s in steps)
    for step, ref in zip(steps, reference):
        torch.testing.assert_close(step, ref, rtol=1e-7, atol=1e-10)
