"""The physical floor of a curvature pass, measured like a library (issue 13).

``floor = plain gradient + C output directions backpropagated by autograd VJPs
+ the Gram matrix's minimum multiply-adds at big-GEMM speed + eigvalsh``
(eigenvalues); the **full floor** (eigenpairs, directional derivatives and a
Newton step, the ``newton`` configuration) replaces ``eigvalsh`` by ``eigh``
and adds the minimum work of the Newton step:

* gradient: forward and backward of the plain (BackPACK-inactive) model;
* VJPs: ``C`` vector-Jacobian products from the model output to the output of
  the first layer with parameters (the backpropagation any factor needs), one
  after the other or batched (``is_grads_batched``), whichever a calibration
  at set-up finds faster;
* Gram: the multiply-adds of the cheapest plan per layer given factored
  layers (:meth:`vivitlib.factors.CostModel.gram_costs` for linear and
  unfoldable convolution weights, ``(C·N)²·D_p / 2`` for any other parameter),
  executed as square float32 GEMMs of the same total work, i.e. at big-GEMM
  speed on the same device in the same run;
* eigvalsh of an ``NC × NC`` float64 symmetric matrix;
* full floor only: ``eigh`` (with eigenvectors) instead, and the
  multiply-adds of one application of ``Vᵀ`` (the batch gradient's ``Vᵀg``)
  and one of ``V`` (lifting the step) given factored layers, again at
  big-GEMM speed (:func:`lift_macs`; the ``M × K`` products with the Gram
  eigenvectors are left out, they are below 1 % of the Gram's work).

:func:`floor_runner` returns a zero-argument callable like the libraries'
runners; its ``components`` attribute holds the last call's seconds per part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from experiments.benchmarks.ggn.problems import Problem
from vivitlib.factors import CostModel

outer_costs, dense_cost = CostModel.gram_costs, CostModel.dense_gram_cost

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _module_cost(module: nn.Module, inp: Tensor, out: Tensor, C: int) -> int:
    """Minimum Gram multiply-adds of one module's own parameters."""
    N = inp.shape[0]
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    weight = getattr(module, "weight", None)
    total = 0
    if isinstance(module, nn.Linear) and weight is not None and weight.requires_grad:
        I, O = module.in_features, module.out_features  # noqa: E741
        total += min(outer_costs(C, N, inp[0].numel() // I, O, I).values())
        params = [p for p in params if p is not weight]
    elif (
        isinstance(module, _CONV)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and weight is not None
        and weight.requires_grad
    ):
        T, O = out[0, 0].numel(), module.out_channels  # noqa: E741
        total += min(outer_costs(C, N, T, O, weight[0].numel()).values())
        params = [p for p in params if p is not weight]
    bias = getattr(module, "bias", None)
    for p in params:
        # a bias's factor is dense [C, N, O] after the sum over positions
        total += dense_cost(C, N, p.shape[0] if p is bias else p.numel())
    return total


def _module_lift_cost(module: nn.Module, inp: Tensor, out: Tensor, C: int) -> int:
    """Multiply-adds of ``V c`` (one vector) for one module's own parameters.

    An outer-product weight (``T`` positions) combines the coefficients with
    its factor (``C·N·T·O``) and the result with its input (``N·T·O·I``); any
    other parameter applies its dense factor (``C·N·D_p``).
    """
    N = inp.shape[0]
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    weight = getattr(module, "weight", None)
    total = 0
    if (
        weight is not None
        and weight in params
        and isinstance(module, (nn.Linear, *_CONV))
    ):
        O, I = weight.shape[0], weight[0].numel()  # noqa: E741
        if isinstance(module, nn.Linear):
            T = inp[0].numel() // module.in_features
        else:
            T = out[0, 0].numel()
        total += C * N * T * O + N * T * O * I
        params = [p for p in params if p is not weight]
    return total + sum(C * N * p.numel() for p in params)


def _sum_over_modules(problem: Problem, cost) -> int:
    """``cost(module, input, output, C)`` summed over modules with parameters."""
    total = 0
    handles = []

    def hook(module, inputs, output):
        nonlocal total
        total += cost(module, inputs[0], output, num_columns)

    with torch.no_grad():
        num_columns = problem.model(problem.X[:1]).shape[-1]
        for module in problem.model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                handles.append(module.register_forward_hook(hook))
        try:
            problem.model(problem.X)
        finally:
            for handle in handles:
                handle.remove()
    return total


def gram_macs(problem: Problem) -> int:
    """Minimum multiply-adds of the Gram matrix, from one forward pass's shapes."""
    return _sum_over_modules(problem, _module_cost)


def lift_macs(problem: Problem) -> int:
    """Multiply-adds of one application of ``V`` (or ``Vᵀ``) to a vector."""
    return _sum_over_modules(problem, _module_lift_cost)


def _first_with_params(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return module
    raise ValueError("The model has no trainable parameters.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _faster_vjps(call: Callable[[bool], None], device: torch.device) -> bool:
    """Whether batched VJPs beat a loop (best of two timed calls each)."""
    best = {}
    for batched in (False, True):
        try:
            call(batched)  # warm-up
        except RuntimeError:  # an operation without a batching rule
            best[batched] = float("inf")
            continue
        times = []
        for _ in range(2):
            _sync(device)
            start = time.perf_counter()
            call(batched)
            _sync(device)
            times.append(time.perf_counter() - start)
        best[batched] = min(times)
    return best[True] < best[False]


def _gemm_repeats(macs: int, device: torch.device) -> tuple[int, int]:
    """Square GEMM size and count doing ``macs`` multiply-adds (rounded)."""
    size = 2048 if device.type == "cuda" else 1024
    while size > 64 and macs < 8 * size**3:
        size //= 2
    return size, max(1, round(macs / size**3))


def floor_runner(problem: Problem, full: bool = False) -> Callable[[], Any]:
    """A callable doing the floor's work once; ``.components`` per call (seconds).

    Args:
        problem: The problem.
        full: The full-compute floor (``eigh`` and the Newton step's minimum
            work, components ``grad, vjp, gram, newton, eigh``) instead of the
            eigenvalue floor (``grad, vjp, gram, eigvalsh``).
    """
    X, model = problem.X, problem.model
    device = X.device
    with torch.no_grad():
        out_shape = model(X).shape
    C, N = out_shape[-1], X.shape[0]
    macs = gram_macs(problem)
    size, repeats = _gemm_repeats(macs, device)
    lift = 2 * lift_macs(problem) if full else 0
    lift_size, lift_repeats = _gemm_repeats(lift, device) if full else (1, 0)
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(size, size, generator=gen, device=device)
    B = torch.randn(size, size, generator=gen, device=device)
    prod = torch.empty(size, size, device=device)
    R = torch.randn(N * C, N * C, generator=gen, device=device, dtype=torch.float64)
    sym = R @ R.T
    seeds = torch.randn(C, *out_shape, generator=gen, device=device, dtype=X.dtype)
    A_lift, B_lift, prod_lift = (
        torch.randn(lift_size, lift_size, generator=gen, device=device)
        for _ in range(3)
    )
    first = _first_with_params(model)
    captured: dict[str, Tensor] = {}
    handle = first.register_forward_hook(lambda m, i, o: captured.update(out=o))

    def vjps(out: Tensor, batched: bool) -> None:
        if batched:
            torch.autograd.grad(out, captured["out"], seeds, is_grads_batched=True)
            return
        for c in range(C):
            torch.autograd.grad(out, captured["out"], seeds[c], retain_graph=c < C - 1)

    batched = _faster_vjps(lambda b: vjps(model(X), b), device)

    def run() -> dict[str, float]:
        times: dict[str, float] = {}
        _sync(device)
        start = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal start
            _sync(device)
            now = time.perf_counter()
            times[name] = now - start
            start = now

        problem.zero_grad()
        out = model(X)
        problem.loss_fn(out, problem.y).backward(retain_graph=True)
        lap("grad")
        vjps(out, batched)
        lap("vjp")
        for _ in range(repeats):
            torch.mm(A, B, out=prod)
        lap("gram")
        if full:
            for _ in range(lift_repeats):
                torch.mm(A_lift, B_lift, out=prod_lift)
            lap("newton")
            torch.linalg.eigh(sym)
            lap("eigh")
        else:
            torch.linalg.eigvalsh(sym)
            lap("eigvalsh")
        run.components = times
        return times

    run.components = {}
    run.batched_vjps = batched
    run.gram_macs = macs
    run.lift_macs = lift
    run.handle = handle
    return run
