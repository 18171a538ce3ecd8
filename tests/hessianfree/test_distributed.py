"""Products and spectra on 2 gloo ranks equal the single-process ones."""

import socket
import time

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
    ).evals
    out["density"] = hf.spectral_density(
        H,
        num_iters=8,
        num_probes=3,
        deflate=0,
        generator=torch.Generator().manual_seed(0),
    ).density
    return out


TIMEOUT = 1.5


def _worker(rank, port, queue, release):
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
        _fail_on_rank_1(rank, problem, queue, release)
    finally:
        dist.destroy_process_group()


def _fail_on_rank_1(rank, problem, queue, release):
    """Rank 1 fails after the build but stays alive; rank 0 calls a product."""
    op = hf.HessianOperator(
        problem.model, problem.loss_fn, problem.batches, timeout=TIMEOUT
    )
    if rank == 1:
        try:
            raise ValueError("simulated error on rank 1")
        except ValueError:
            release.wait(60)  # alive, but never joins the next collective
        return
    start = time.monotonic()
    try:
        op @ torch.ones(op.shape[0], dtype=torch.float64)
        queue.put(("failure", ("no error", time.monotonic() - start)))
    except RuntimeError as err:
        queue.put(("failure", (str(err), time.monotonic() - start)))


@pytest.fixture(scope="module")
def gloo_run():
    """Run both scenarios on 2 gloo ranks once (spawning costs seconds)."""
    ctx = mp.get_context("spawn")
    queue, release = ctx.Queue(), ctx.Event()
    procs = mp.spawn(
        _worker, args=(_free_port(), queue, release), nprocs=WORLD, join=False
    )
    try:
        results = dict(queue.get(timeout=120) for _ in range(WORLD + 1))
    finally:
        release.set()
        while not procs.join(timeout=60):  # raises if a worker failed
            pass
    return results


def test_two_gloo_ranks_match_single_process(gloo_run):
    problem = make_problem(CASES[0])
    data = TensorDataset(problem.X[:12], problem.y[:12])
    ref = _compute(problem, DataLoader(data, batch_size=5))
    for rank in range(WORLD):
        for key, value in ref.items():
            torch.testing.assert_close(
                torch.from_numpy(gloo_run[rank][key]),
                value,
                rtol=1e-9,
                atol=1e-11,
                msg=f"rank {rank}: {key}",
            )


def test_failed_rank_makes_the_other_raise_within_the_timeout(gloo_run):
    message, elapsed = gloo_run["failure"]
    assert "did not complete within timeout=1.5 s" in message
    assert "another rank probably raised an error" in message
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 5.0  # instead of 30 minutes


def test_distributed_true_without_group_raises():
    problem = make_problem(CASES[0])
    with pytest.raises(RuntimeError, match="init_process_group"):
        hf.HessianOperator(
            problem.model, problem.loss_fn, problem.batches, distributed=True
        )


def test_timeout_is_validated_without_a_group():
    problem = make_problem(CASES[0])
    with pytest.raises(ValueError, match="timeout must be a finite positive"):
        hf.HessianOperator(problem.model, problem.loss_fn, problem.batches, timeout=0)
