"""Peak memory of one computation at one batch size, meant for a fresh subprocess.

``python -m experiments.scale.measure --problem P --method M --batch-size N`` prints
one JSON line ``{"peak_bytes": ..., "seconds": ..., "error": ...}``. On CUDA the peak
is ``torch.cuda.max_memory_allocated`` above the memory held before the pass; on CPU
it is the process's peak resident set size above the resident size before the pass
(Linux ``ru_maxrss``), so each measurement needs its own process.

Methods (Dangel et al., 2022, *ViViT*, Figure 1b/c):

* ``gradient``: a plain backward pass;
* ``ggn_exact`` / ``ggn_subsampled`` / ``ggn_mc``: the GGN's nontrivial eigenvalues
  with the exact factor, curvature sub-sampling (1/8 of the samples), one MC sample;
* ``newton_layerwise``: exact damped Newton steps of the layer-wise block-diagonal GGN;
* ``vivit_eigvalsh``: the GGN eigenvalues with ``vivit-for-pytorch`` when installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import torch

from experiments.problems import INPUT_SHAPES, get_problem, make_extended

METHODS = ("gradient", "ggn_exact", "ggn_subsampled", "ggn_mc", "newton_layerwise")
OPTIONAL_METHODS = ("vivit_eigvalsh",)
OUT_OF_MEMORY = "out of memory"


def vivit_available() -> bool:
    """Tell whether ``vivit-for-pytorch`` can be imported."""
    import importlib.util

    return importlib.util.find_spec("vivit") is not None


def run_method(method: str, model, loss_fn, inputs, labels) -> None:
    """Perform the computation ``method`` once."""
    if method == "gradient":
        loss_fn(model(inputs), labels).backward()
    elif method == "vivit_eigvalsh":
        _vivit_eigvalsh(model, loss_fn, inputs, labels)
    else:
        _vivitlib(method, model, loss_fn, inputs, labels)


def _vivitlib(method, model, loss_fn, inputs, labels) -> None:
    import vivitlib
    from experiments.common.curvature import low_rank_ggn

    kwargs = {
        "ggn_exact": {},
        "ggn_subsampled": {"subsampling": range(max(1, len(labels) // 8))},
        "ggn_mc": {"mc_samples": 1},
    }
    if method == "newton_layerwise":
        ggn = low_rank_ggn(
            model,
            loss_fn,
            inputs,
            labels,
            params=vivitlib.layerwise_groups(model),
            compute=("eigenvalues", "newton_step"),
        )
        for block in ggn.blocks:
            block.newton_step(1e-3)
        return
    ggn = low_rank_ggn(
        model, loss_fn, inputs, labels, compute=("eigenvalues",), **kwargs[method]
    )
    _ = [block.evals for block in ggn.blocks]


def _vivit_eigvalsh(model, loss_fn, inputs, labels) -> None:
    from backpack import backpack
    from vivit.linalg.eigvalsh import EigvalshComputation

    # vivit-for-pytorch 1.0 calls ``Tensor.symeig``, removed in torch 2; route it to
    # ``torch.linalg.eigvalsh`` (same memory profile) so the comparison can run.
    torch.Tensor.symeig = _symeig_compat

    computation = EigvalshComputation()
    group = {"params": [p for p in model.parameters() if p.requires_grad]}
    extension = computation.get_extension()
    hook = computation.get_extension_hook([group])
    with backpack(extension, extension_hook=hook):
        loss_fn(model(inputs), labels).backward()
    computation.get_result(group)


def _symeig_compat(matrix, eigenvectors=False):
    if eigenvectors:
        return torch.linalg.eigh(matrix)
    return torch.linalg.eigvalsh(matrix), None


def measure(problem_name: str, method: str, batch_size: int, device: str) -> dict:
    """Measure the peak memory and time of one pass (in this process).

    Args:
        problem_name: Registered problem.
        method: One of :data:`METHODS` or :data:`OPTIONAL_METHODS`.
        batch_size: Mini-batch size ``N``.
        device: ``'cpu'`` or ``'cuda'``.

    Returns:
        ``{"peak_bytes": int, "seconds": float, "error": str | None}``; errors
        are reported, not raised (``'out of memory: ...'`` or ``'failed: ...'``).

    """
    problem = get_problem(problem_name)
    shape = INPUT_SHAPES[problem.dataset]
    model, loss_fn = make_extended(problem, shape, 10)
    model = model.to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, *shape, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    before = _current_bytes(device)
    start, error = time.perf_counter(), None
    try:
        run_method(method, model, loss_fn, inputs, labels)
    except (torch.OutOfMemoryError, MemoryError) as err:
        error = f"{OUT_OF_MEMORY}: {type(err).__name__}"
    except Exception as err:  # noqa: BLE001 - reported in the result table
        error = f"failed: {type(err).__name__}: {str(err)[:200]}"
    seconds = time.perf_counter() - start
    return {
        "peak_bytes": int(_peak_bytes(device) - before),
        "seconds": seconds,
        "error": error,
    }


def _current_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    """Measure one configuration and print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", required=True)
    parser.add_argument("--method", required=True, choices=METHODS + OPTIONAL_METHODS)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.problem, args.method, args.batch_size, args.device)))


if __name__ == "__main__":
    main()
