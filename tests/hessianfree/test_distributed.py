"""Products and spectra on 2 gloo ranks equal the single-process ones."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests.hessianfree.cases import CASES, make_problem
from vivitlib import hessianfree as hf

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compute(problem, loader):
    """Everything compared between the runs, as a dict of tensors."""
    out = {}
    for name, cls in [
        ("H", hf.HessianOperator),
        ("G", hf.GGNOperator),
        ("F", hf.EmpiricalFisherOperator),
    ]:
        op = cls(problem.model, problem.loss_fn, loader)
        V = torch.linspace(-1, 1, op.shape[0] * 2, dtype=torch.float64)
        out[name] = op @ V.reshape(op.shape[0], 2)
    H = hf.HessianOperator(problem.model, problem.loss_fn, loader)
    out["alphas"] = hf.lanczos(H, 10, generator=torch.Generator().manual_seed(0)).alphas
    out["top"] = hf.topk_eigh(
        H, 3, tol=1e-8, generator=torch.Generator().manual_seed(0)
    ).eigenvalues
    out["density"] = hf.spectral_density(
        H,
        num_iters=8,
        num_probes=3,
        deflate=0,
        generator=torch.Generator().manual_seed(0),
    ).density
    return out


def _worker(rank, port, queue):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.set_num_threads(1)
        problem = make_problem(CASES[0])
        data = TensorDataset(problem.X[:12], problem.y[:12])  # divisible by 2
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
        out = _compute(problem, DataLoader(data, batch_size=4, sampler=sampler))
        # numpy arrays are pickled by value; torch tensors would travel as shared
        # file descriptors that vanish if the worker exits before they are read
        queue.put((rank, {k: v.detach().cpu().numpy() for k, v in out.items()}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.spawn(_worker, args=(_free_port(), queue), nprocs=WORLD, join=False)
    results = dict(queue.get(timeout=60) for _ in range(WORLD))
    while not procs.join(timeout=60):  # raises if a worker failed
        pass
    problem = make_problem(CASES[0])
    data = TensorDataset(problem.X[:12], problem.y[:12])
    ref = _compute(problem, DataLoader(data, batch_size=5))
    for rank in range(WORLD):
        for key, value in ref.items():
            torch.testing.assert_close(
                torch.from_numpy(results[rank][key]),
                value,
                rtol=1e-9,
                atol=1e-11,
                msg=f"rank {rank}: {key}",
            )


def test_distributed_true_without_group_raises():
    problem = make_problem(CASES[0])
    with pytest.raises(RuntimeError, match="init_process_group"):
        hf.HessianOperator(
            problem.model, problem.loss_fn, problem.batches, distributed=True
        )
