"""Time the Gram contraction of one weight-shared layer (issue 13, item 1).

``python -m experiments.benchmarks.ggn.gram_kernel [--batch-sizes 64 256]
[--baseline OLD_KERNELS.py] [--repeats 5]``

Builds random factors shaped like DeepOBS 3C3D's last convolution on CIFAR-10
(``C = 10`` columns, ``T = 36`` positions, ``O = 128`` outputs, ``I = 96·3·3``
unfolded inputs) with the strides BackPACK hands over (``s`` a transposed view
of ``[C, N, O, T]``, ``a`` of ``[N, I, T]``), and times
:meth:`vivitlib.factors.UnfoldedFactor.contract` for the Gram matrix alone and with
per-sample gradients, single-threaded, as the median of interleaved runs. With
``--baseline`` a second ``kernels`` module (e.g. an older version from
``git show REV:vivitlib/factors/kernels.py``, ``vivitlib/extensions/kernels.py``
before the move) is timed in the same rounds; if it holds the pairwise plan
too (before :mod:`vivitlib.factors.pairwise` was split off), that is used.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from vivitlib.factors import (
    OuterFactor,
    OuterGrads,
    kernels,
    outer_factor,
    pairwise,
    unfolded,
)

#: 3C3D's last convolution on 32x32 inputs: (C, T, O, I).
SHAPE = (10, 36, 128, 96 * 9)


def make_inputs(N: int, seed: int = 0) -> tuple[OuterFactor, OuterGrads]:
    """Random factor and gradients with BackPACK's strides."""
    C, T, O, I = SHAPE  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(C, N, O, T, generator=gen).transpose(2, 3)
    a = torch.randn(N, I, T, generator=gen).transpose(1, 2)
    delta = torch.randn(N, O, T, generator=gen).transpose(1, 2)
    return outer_factor(s, a, "a"), OuterGrads(delta, a, "a")


def _load(path: str):
    spec = importlib.util.spec_from_file_location("baseline_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    """Print and return ``{(N, what, version): median seconds}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    versions = {"current": (kernels, pairwise)}
    if args.baseline:
        old = _load(args.baseline)
        versions["baseline"] = (old, old if hasattr(old, "pairwise_gram") else pairwise)
    medians = {}
    for N in args.batch_sizes:
        factor, grads = make_inputs(N)
        for what, g in (("gram", None), ("gram+vtg", grads)):
            runs: dict[str, list[float]] = {v: [] for v in versions}
            for _ in range(args.repeats + 1):
                for name, modules in versions.items():
                    unfolded.kernels, unfolded.pairwise = modules
                    start = time.perf_counter()
                    factor.contract(g)
                    runs[name].append(time.perf_counter() - start)
            unfolded.kernels, unfolded.pairwise = kernels, pairwise
            for name, t in runs.items():
                med = medians[(N, what, name)] = statistics.median(t[1:])
                runs_s = [round(x, 3) for x in t[1:]]
                print(f"N={N} {what:9s} {name:8s} median {med:.3f} s  runs {runs_s}")
    return medians


if __name__ == "__main__":
    main()
