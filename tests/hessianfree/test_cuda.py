"""Issue 10 on a GPU: data and generators on another device than the model.

Skipped without CUDA (CI); run on a GPU machine when one is available.
"""

import pytest
import torch

from tests.hessianfree.cases import CASES, DENSE, make_problem
from tests.hessianfree.test_guards import _state, assert_untouched
from vivitlib import hessianfree as hf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_operator(cls=hf.HessianOperator, batches=None):
    problem = make_problem(CASES[0])
    dense = DENSE["hessian" if cls is hf.HessianOperator else "ggn"](problem)
    model = problem.model.cuda()
    data = problem.batches if batches is None else batches(problem)
    return problem, cls(model, problem.loss_fn, data), dense


@pytest.mark.parametrize("cls", [hf.HessianOperator, hf.GGNOperator])
def test_cpu_batches_for_a_cuda_model_are_moved(cls):
    _, op, dense = _cuda_operator(cls)  # batches stay on the CPU
    assert op.device.type == "cuda"
    v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
    out = op @ v  # a CPU vector: the product comes back on the CPU
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, dense @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_generators_on_either_device(gen_device):
    _, op, dense = _cuda_operator()
    exact = torch.linalg.eigvalsh(dense).flip(0)

    def gen():
        return torch.Generator(device=gen_device).manual_seed(0)

    res = hf.topk_eigh(op, 2, tol=1e-8, generator=gen())
    torch.testing.assert_close(res.evals.cpu(), exact[:2], rtol=1e-7, atol=1e-10)
    trace = hf.hutchinson_trace(op, 30, generator=gen())
    assert abs(trace.estimate - exact.sum().item()) <= 5 * trace.std_error + 1e-9
    sd = hf.spectral_density(op, num_iters=5, num_probes=2, deflate=2, generator=gen())
    ref = hf.spectral_density(  # the same probes on the dense matrix
        dense.to(op.device), num_iters=5, num_probes=2, deflate=2, generator=gen()
    )
    torch.testing.assert_close(sd.nodes, ref.nodes, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sd.weights, ref.weights, rtol=1e-8, atol=1e-12)
    scale = ref.density.abs().max().item()
    torch.testing.assert_close(sd.density, ref.density, rtol=0, atol=1e-8 * scale)
    cpu = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    res = hf.power_iteration(cpu, 2, tol=1e-10, max_iters=500, generator=gen())
    torch.testing.assert_close(
        res.evals,
        torch.tensor([5.0, 4.0], dtype=torch.float64),
        atol=1e-4,
        rtol=0,
    )


def test_cuda_cache_follows_data_edits_and_nan_is_refused():
    problem, op, _ = _cuda_operator(batches=lambda p: (p.X, p.y))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    op @ v
    for p in problem.model.parameters():
        p.data.mul_(1.5)
    problem.model.cpu()
    ref = DENSE["hessian"](problem) @ v
    problem.model.cuda()
    torch.testing.assert_close(op @ v, ref, rtol=1e-10, atol=1e-12)
    problem.model[0].weight.data[0, 0] = float("nan")
    before = _state(problem.model)
    with pytest.raises(ValueError, match=r"\['0.weight'\] contain NaN"):
        hf.topk_eigh(op, 1)
    assert_untouched(problem.model, before)
