"""LowRankGGN across gloo ranks equals one process on the concatenated batch."""

import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backpack import backpack

import vivitlib
from tests.core.cases import CASES, make_problem
from vivitlib.distributed import new_group_with_timeout

_BY_ID = {c["id"]: c for c in CASES}
# (case, options); each runs on every world size
SETTINGS = [
    ("mlp-ce-mean", {}),
    ("mlp-mse-sum", {}),
    ("cnn-ce", {}),
    ("resnet-converter-ce", {}),
    ("ce-ignore-index-mean", {}),
    ("mlp-ce-mean", {"layerwise": True}),
    ("cnn-ce", {"subsampling": [5, 0, 2], "grad_subsampling": [1, 6]}),
]
BATCH = 7  # split unevenly over the ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shards(world: int) -> list[range]:
    bounds = np.linspace(0, BATCH, world + 1).round().astype(int)
    bounds[1] = max(bounds[1] - 1, 1)  # uneven on purpose
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


def _batch(case_id):
    case = dict(_BY_ID[case_id])
    case["x"] = (BATCH, *case["x"][1:])
    problem = make_problem(case)
    if case_id == "ce-ignore-index-mean":
        problem.y[4], problem.y[3] = 0, -100  # no shard entirely ignored (NaN loss)
    return problem


def _results(case_id, options, process_group=None, rows=None):
    problem = _batch(case_id)
    X, y = problem.X, problem.y
    if rows is not None:
        X, y = X[rows], y[rows]
    groups = (
        vivitlib.layerwise_groups(problem.model)
        if options.get("layerwise")
        else problem.params
    )
    ggn = vivitlib.LowRankGGN(
        groups,
        subsampling=options.get("subsampling"),
        grad_subsampling=options.get("grad_subsampling"),
        process_group=process_group,
    )
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        problem.loss_fn(problem.model(X), y).backward()
    out = {}
    for i, block in enumerate(ggn.blocks):
        step = torch.cat([s.flatten() for s in block.newton_step(0.1)])
        out[f"{i}/evals"] = block.evals
        out[f"{i}/lambdas"] = block.lambdas
        out[f"{i}/abs_gammas"] = block.gammas.abs()
        out[f"{i}/step"] = step
        out[f"{i}/grad"] = torch.cat([g.flatten() for g in block.grad])
        evecs = torch.cat([e.flatten(1) for e in block.evecs(2)], 1)
        out[f"{i}/evecs"] = evecs
    sent = sum(t.bytes_sent for t in ggn.communication)
    dense = sum(t.dense_bytes for t in ggn.communication)
    return {k: v.detach().numpy() for k, v in out.items()}, sent, dense


def _worker(rank, world, port, queue):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        shard = list(_shards(world)[rank])
        for index, (case_id, options) in enumerate(SETTINGS):
            out, sent, dense = _results(case_id, options, True, shard)
            queue.put((rank, index, out, sent, dense))
        for closure in (True, False):
            params = _newton_steps(world, rank, closure)
            queue.put((rank, f"newton-{closure}", params, 0, 0))
        draws = [_mc_evals(rank, shard) for _ in range(2)]
        queue.put((rank, "mc", draws, 0, 0))
        _failing_rank(rank, queue)
    except Exception as err:  # report instead of hanging the parent
        queue.put((rank, -1, repr(err), 0, 0))
    finally:
        dist.destroy_process_group()


def _mc_evals(rank, shard):
    """Monte-Carlo eigenvalues of the global batch from per-rank generators."""
    problem = _batch("cnn-ce")
    ggn = vivitlib.LowRankGGN(
        problem.params, mc_samples=2, process_group=True,
        generator=torch.Generator().manual_seed(100 + rank),
    )  # fmt: skip
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        problem.loss_fn(problem.model(problem.X[shard]), problem.y[shard]).backward()
    return ggn.blocks[0].evals.numpy()


NEWTON_BATCH = 8  # divisible by 2 and 4: the local mean losses average to the global


def _newton_steps(world=1, rank=0, closure=True):
    """Parameters after 3 safeguarded DampedNewton steps (under DDP if world > 1)."""
    from torch.nn.parallel import DistributedDataParallel

    case = dict(_BY_ID["mlp-ce-mean"], x=(NEWTON_BATCH, 5))
    problem = make_problem(case)
    rows = slice(rank * NEWTON_BATCH // world, (rank + 1) * NEWTON_BATCH // world)
    X, y = problem.X[rows], problem.y[rows]
    model = problem.model if world == 1 else DistributedDataParallel(problem.model)
    opt = vivitlib.optim.DampedNewton(
        problem.params, damping=0.05, mc_samples=0,
        process_group=True if world > 1 else None,
    )  # fmt: skip

    def compute():
        opt.zero_grad()
        loss = problem.loss_fn(model(X), y)
        loss.backward()
        return loss

    for _ in range(3):
        if closure:
            opt.step(compute)
        else:
            with backpack(*opt.extensions, extension_hook=opt.hook):
                compute()
            opt.step()
    return torch.cat([p.detach().flatten() for p in problem.params]).numpy()


def _failing_rank(rank, queue):
    """Rank 1 raises before its pass; rank 0 must raise within the timeout."""
    group = new_group_with_timeout(2.0)
    problem = _batch("mlp-ce-mean")
    ggn = vivitlib.LowRankGGN(problem.params, process_group=group)
    if rank == 1:
        queue.put((rank, "failure", "rank 1 raised", 0, 0))
        time.sleep(6)  # alive, but never joins the exchange
        return
    start = time.monotonic()
    try:
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            problem.loss_fn(problem.model(problem.X), problem.y).backward()
        message = "no error"
    except Exception as err:  # noqa: BLE001 - the type depends on the backend
        message = type(err).__name__
    queue.put((rank, "failure", message, time.monotonic() - start, 0))


@pytest.fixture(scope="module", params=[2, 4])
def world_results(request):
    world = request.param
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    expected = world * (len(SETTINGS) + 4)
    deadline = time.monotonic() + 240
    while len(results) < expected and time.monotonic() < deadline:
        try:
            rank, index, out, sent, dense = queue.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty
            if not any(p.is_alive() for p in procs):
                break
            continue
        if index == -1:
            pytest.fail(f"rank {rank} raised {out}")
        results[(rank, index)] = (out, sent, dense)
    for p in procs:
        p.join(30)
    return world, results


@pytest.mark.parametrize("index", range(len(SETTINGS)))
def test_global_batch_equals_single_process(world_results, index):
    world, results = world_results
    case_id, options = SETTINGS[index]
    single, _, _ = _results(case_id, options)
    for rank in range(world):
        out, sent, dense = results[(rank, index)]
        assert sent > 0 and dense > 0
        for key, value in single.items():
            if key.endswith("evecs"):  # up to sign
                signs = np.sign((out[key] * value).sum(1, keepdims=True))
                np.testing.assert_allclose(out[key] * signs, value, atol=1e-8)
            else:
                np.testing.assert_allclose(out[key], value, rtol=1e-7, atol=1e-10)
        # identical on every rank
        first, _, _ = results[(0, index)]
        for key in out:
            np.testing.assert_array_equal(out[key], first[key])


@pytest.mark.parametrize("closure", [True, False])
def test_damped_newton_steps_agree_across_ranks(world_results, closure):
    world, results = world_results
    single = _newton_steps(closure=closure)
    first = results[(0, f"newton-{closure}")][0]
    assert not np.allclose(first, _initial_newton_params())  # it moved
    for rank in range(world):
        params = results[(rank, f"newton-{closure}")][0]
        np.testing.assert_array_equal(params, first)  # identical on every rank
        np.testing.assert_allclose(params, single, rtol=1e-7, atol=1e-9)


def test_monte_carlo_with_per_rank_generators_is_reproducible(world_results):
    world, results = world_results
    first = results[(0, "mc")][0]
    np.testing.assert_array_equal(first[0], first[1])  # same seeds, same draws
    for rank in range(world):
        np.testing.assert_array_equal(results[(rank, "mc")][0][0], first[0])
    # the MC factor has 2 columns per sample: at most 2·N eigenvalues
    assert 0 < len(first[0]) <= 2 * BATCH


def _initial_newton_params():
    problem = make_problem(dict(_BY_ID["mlp-ce-mean"], x=(NEWTON_BATCH, 5)))
    return torch.cat([p.detach().flatten() for p in problem.params]).numpy()


def test_linear_layers_send_less_than_dense_factor(world_results):
    _, results = world_results
    _, sent, dense = results[(0, 0)]  # the MLP: outer pieces per weight
    assert sent < dense


def test_a_failing_rank_makes_the_others_raise_within_the_timeout(world_results):
    world, results = world_results
    message, elapsed, _ = results[(0, "failure")]
    assert message != "no error"
    assert elapsed < 30


@pytest.mark.slow  # end to end; runs in the full suite (CI), not in `make test`
def test_torchrun_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "docs" / "examples" / "ddp_curvature.py"
    for _attempt in range(2):  # a fresh port on retry: another test may race for it
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(_free_port()), str(script)],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )  # fmt: skip
        if run.returncode == 0:
            break
    assert run.returncode == 0, run.stderr[-2000:]
    import re

    lines = re.findall(r"rank (\d): (K=.*?\(dense V: \d+ B\))", run.stdout)
    assert sorted(rank for rank, _ in lines) == ["0", "1"], run.stdout
    assert lines[0][1] == lines[1][1]  # the same curvature on both ranks


@pytest.mark.slow
def test_distributed_benchmark_smoke(tmp_path):
    from experiments.benchmarks.distributed import run

    rows = run.main(["--ranks", "1", "2", "--batch-size", "4", "--repeats", "1",
                     "--out", str(tmp_path)])  # fmt: skip
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[1]["bytes_sent_per_rank"] < rows[0]["bytes_sent_per_rank"]
    assert (tmp_path / "results.md").exists()
