"""Side-by-side benchmark: vivitlib.hessianfree vs PyHessian vs curvlinops vs eigsh.

Problem (issue 6): 1000 digits, 64-200-10 tanh MLP (D = 15,010), 200 full-batch
SGD steps at lr 0.5, cross-entropy. The exact float64 Hessian eigenvalues are
computed once (torch.func, ~15 min on 2 CPU cores) and cached in ``--out``.

Sections: top-k eigenvalues (products / time to 1e-3 relative error), spectral
density (L1 to the exact smoothed density, kernel variance 1e-5 on the
spectrum normalized to [-1, 1] with the exact range plus a 5 % margin; SLQ
against the kernel polynomial method's Chebyshev density, :mod:`.kpm`, at the
same number of products), trace
(relative error at 100 products) and product speed. Peers are optional.

Usage::

    python -m experiments.benchmarks.hessianfree.run [--out DIR] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.sparse.linalg import eigsh

from experiments.benchmarks.hessianfree import peers
from experiments.benchmarks.hessianfree.kpm import kpm_density
from experiments.benchmarks.hessianfree.problem import (
    HIDDEN,
    NUM_DATA,
    STEPS,
    exact_eigenvalues,
    make_problem,
)
from experiments.common.files import atomic_write_bytes
from experiments.common.locking import claim_folder
from experiments.common.tables import write_table
from vivitlib import hessianfree as hf

KERNEL_VAR = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(est, exact) -> float:
    est = np.sort(np.asarray(est, dtype=np.float64))[::-1]
    return float(np.max(np.abs(est - exact[: len(est)]) / np.abs(exact[: len(est)])))


# ---- top-k ------------------------------------------------------------------
def _measured(method, k, seed, top, counter, call) -> dict:
    """Run ``call`` once (products counted by ``counter``) into one table row."""
    counter.n = 0
    t = time.perf_counter()
    vals = call()
    return dict(
        method=method,
        k=k,
        seed=seed,
        products=counter.n,
        seconds=time.perf_counter() - t,
        max_rel_err=rel_err(vals, top),
    )


class _OpCounter:
    """Adapter: ``.n`` reads and resets a vivitlib operator's product count."""

    def __init__(self, op):
        self.op = op

    @property
    def n(self) -> int:
        return self.op.num_products

    @n.setter
    def n(self, value: int) -> None:
        self.op.num_products = value


def _eigsh(op_scipy, k, v0):
    return eigsh(op_scipy, k=k, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)


def _topk_vivitlib(H, k, seed):
    return hf.topk_eigh(H, k, tol=1e-3, generator=gen(seed)).evals


def _topk_pyhessian(obj, k, tol):
    return obj.eigenvalues(maxIter=100, tol=tol, top_n=k)[0]


def bench_topk(ctx, seeds, ks=(1, 5, 20)):
    H, top = ctx["H"], ctx["evals"][::-1]
    ours = _OpCounter(H)
    rows = []
    for k in ks:
        for seed in seeds:
            v0 = hf._krylov.rademacher(H.shape[0], 1, gen(seed), "cpu")[:, 0].numpy()
            runs = [
                ("vivitlib topk_eigh", ours, partial(_topk_vivitlib, H, k, seed)),
                (
                    "scipy eigsh (vivitlib op)",
                    ours,
                    partial(_eigsh, H.to_scipy(), k, v0),
                ),
            ]
            if ctx.get("curv"):
                C, counter = ctx["curv"]
                runs.append(
                    (
                        "curvlinops + eigsh",
                        counter,
                        partial(_eigsh, C.to_scipy(), k, v0),
                    )
                )
            if ctx.get("pyh") and (seed == seeds[0] or k < 20):
                obj, counter = ctx["pyh"]
                for tol in (1e-3, 1e-5):
                    runs.append(
                        (f"pyhessian power it. (tol {tol:g})", counter,
                         partial(_topk_pyhessian, obj, k, tol))
                    )  # fmt: skip
            for method, counter, call in runs:
                torch.manual_seed(seed)
                rows.append(_measured(method, k, seed, top, counter, call))
    return pd.DataFrame(rows)


# ---- density ----------------------------------------------------------------
def density_reference(evals):
    lo, hi = evals.min(), evals.max()
    width = hi - lo
    lo, hi = lo - 0.05 * width, hi + 0.05 * width
    c, h = 0.5 * (lo + hi), 0.5 * (hi - lo)
    grid = torch.linspace(-1.02, 1.02, 40_001, dtype=torch.float64)
    t = torch.from_numpy((evals - c) / h)
    ref = hf.smooth(t, torch.full_like(t, 1 / len(t)), grid, math.sqrt(KERNEL_VAR))
    return dict(c=c, h=h, grid=grid, ref=ref)


def l1_nodes(dref, nodes, weights) -> float:
    t = (torch.as_tensor(nodes, dtype=torch.float64) - dref["c"]) / dref["h"]
    w = torch.as_tensor(weights, dtype=torch.float64)
    est = hf.smooth(t, w / w.sum(), dref["grid"], math.sqrt(KERNEL_VAR))
    return torch.trapezoid((est - dref["ref"]).abs(), dref["grid"]).item()


def l1_own(dref, sd) -> float:
    """L1 of vivitlib's own density (its own range and kernel) on the same grid."""
    lam = dref["c"] + dref["h"] * dref["grid"]
    own = np.interp(lam.numpy(), sd.grid.numpy(), sd.density.numpy(), left=0, right=0)
    own = torch.from_numpy(own) * dref["h"]
    return torch.trapezoid((own - dref["ref"]).abs(), dref["grid"]).item()


def _pyhessian_density(obj, num_iters, num_probes):
    """PyHessian's SLQ; it calls the removed ``torch.eig``, shimmed by eigh."""

    def eig(T, eigenvectors=True):
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], 1), V

    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)
    torch.eig = eig
    try:
        nodes, weights = obj.density(iter=num_iters, n_v=num_probes)
    finally:
        if had:
            torch.eig = old
        else:
            del torch.eig
    return (np.concatenate(nodes), np.concatenate(weights) / num_probes)


def bench_density(ctx, seeds):
    H, dref = ctx["H"], ctx["dref"]
    configs = [
        ("vivitlib default (deflate 20 + 22x38)", dict()),
        ("vivitlib 30x30", dict(num_iters=30, num_probes=30, deflate=0)),
        ("vivitlib 90x10", dict(num_iters=90, num_probes=10, deflate=0)),
        (
            "vivitlib 90x10, no reorth.",
            dict(num_iters=90, num_probes=10, deflate=0, reorthogonalize=False),
        ),
    ]
    rows = []
    for seed in seeds:
        for name, kw in configs:
            t = time.perf_counter()
            sd = hf.spectral_density(
                H, kernel_var=KERNEL_VAR, generator=gen(seed), **kw
            )
            rows.append(
                dict(
                    method=name,
                    seed=seed,
                    products=sd.num_products,
                    seconds=time.perf_counter() - t,
                    l1=l1_nodes(dref, sd.nodes, sd.weights),
                    l1_own_range=l1_own(dref, sd),
                )
            )
        rows += bench_kpm(H, dref, seed)
        if ctx.get("pyh"):
            obj, counter = ctx["pyh"]
            counter.n = 0
            torch.manual_seed(seed)
            t = time.perf_counter()
            nodes, weights = _pyhessian_density(obj, 90, 10)
            rows.append(
                dict(
                    method="pyhessian 90x10",
                    seed=seed,
                    products=counter.n,
                    seconds=time.perf_counter() - t,
                    l1=l1_nodes(dref, nodes, weights),
                )
            )
        if ctx.get("curv"):
            C, counter = ctx["curv"]
            counter.n = 0
            t = time.perf_counter()
            nodes, weights = peers.curvlinops_slq(C, 90, 10, seed)
            rows.append(
                dict(
                    method="curvlinops 90x10 (+range)",
                    seed=seed,
                    products=counter.n,
                    seconds=time.perf_counter() - t,
                    l1=l1_nodes(dref, nodes, weights),
                )
            )
    return pd.DataFrame(rows)


#: KPM (Chebyshev) settings ``(moments, probes)`` at about the SLQ default budget.
KPM_CONFIGS = ((88, 20), (176, 10), (440, 4))


def l1_kpm(dref, kpm) -> float:
    """L1 of a KPM density to the exact smoothed density, on the reference grid."""
    lam = (dref["c"] + dref["h"] * dref["grid"]).numpy()
    est = torch.from_numpy(kpm.density(lam) * dref["h"])
    return torch.trapezoid((est - dref["ref"]).abs(), dref["grid"]).item()


def bench_kpm(H, dref, seed) -> list[dict]:
    """Chebyshev/KPM densities (:mod:`.kpm`) at the SLQ budget, one row each."""
    rows = []
    for moments, probes in KPM_CONFIGS:
        t = time.perf_counter()
        kpm = kpm_density(H, moments, probes, generator=gen(seed))
        rows.append(
            dict(
                method=f"KPM Chebyshev {moments} moments x {probes} probes",
                seed=seed,
                products=kpm.num_products,
                seconds=time.perf_counter() - t,
                l1=l1_kpm(dref, kpm),
            )
        )
    return rows


# ---- trace ------------------------------------------------------------------
def bench_trace(ctx, seeds, budget=100):
    H, exact = ctx["H"], float(ctx["evals"].sum())
    rows = []

    def add(method, seed, value, products, seconds):
        rows.append(
            dict(
                method=method,
                seed=seed,
                products=products,
                seconds=seconds,
                rel_err=abs(value - exact) / abs(exact),
            )
        )

    for seed in seeds:
        for method in ("krylov", "hutch++", "hutchinson"):
            t = time.perf_counter()
            est = hf.hutchinson_trace(H, budget, method=method, generator=gen(seed))
            add(
                f"vivitlib {method}",
                seed,
                est.estimate,
                est.num_products,
                time.perf_counter() - t,
            )
        if ctx.get("pyh"):
            obj, counter = ctx["pyh"]
            counter.n = 0
            torch.manual_seed(seed)
            t = time.perf_counter()
            samples = obj.trace(maxIter=budget, tol=0.0)
            add(
                "pyhessian hutchinson",
                seed,
                float(np.mean(samples)),
                counter.n,
                time.perf_counter() - t,
            )
        if ctx.get("curv"):
            from curvlinops import hutchinson_trace, hutchpp_trace, xtrace

            C, counter = ctx["curv"]
            # curvlinops' Hutch++ needs a multiple of 3, XTrace of 2
            for name, fn, n in [
                ("hutchinson", hutchinson_trace, budget),
                ("hutch++", hutchpp_trace, budget // 3 * 3),
                ("xtrace", xtrace, budget // 2 * 2),
            ]:
                counter.n = 0
                torch.manual_seed(seed)
                t = time.perf_counter()
                value = float(fn(C, n))
                add(
                    f"curvlinops {name}",
                    seed,
                    value,
                    counter.n,
                    time.perf_counter() - t,
                )
    return pd.DataFrame(rows)


# ---- product speed ----------------------------------------------------------
def _time(fn, reps=30, rounds=5) -> float:
    fn()
    best = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best.append((time.perf_counter() - t) / reps)
    return statistics.median(best) * 1e3


def bench_speed(ctx, num_batches=4):
    model, loss_fn, X, y = ctx["problem"]
    H = ctx["H"]
    v = torch.randn(H.shape[0], generator=gen(0))
    vl = H.unflatten(v)
    rows = [
        dict(
            setting="1 batch of 1000",
            method="vivitlib (cached graph)",
            ms_per_product=_time(lambda: H @ v),
        )
    ]
    if ctx.get("pyh"):
        ph = sys.modules["pyhessian.hessian"]
        obj, _ = ctx["pyh"]
        rows.append(
            dict(
                setting="1 batch of 1000",
                method="pyhessian (cached graph)",
                ms_per_product=_time(
                    lambda: ph.hessian_vector_product(obj.gradsH, obj.params, vl)
                ),
            )
        )
    if ctx.get("curv"):
        C, _ = ctx["curv"]
        rows.append(
            dict(
                setting="1 batch of 1000",
                method="curvlinops",
                ms_per_product=_time(lambda: C @ v),
            )
        )
    batches = list(zip(X.chunk(num_batches), y.chunk(num_batches)))
    setting = f"{num_batches} batches of {len(X) // num_batches}"
    Hb = hf.HessianOperator(model, loss_fn, batches)
    rows.append(
        dict(
            setting=setting,
            method="vivitlib",
            ms_per_product=_time(lambda: Hb @ v, reps=5),
        )
    )
    params = list(model.parameters())

    def naive():
        out = [torch.zeros_like(p) for p in params]
        for Xb, yb in batches:
            g = torch.autograd.grad(loss_fn(model(Xb), yb), params, create_graph=True)
            hv = torch.autograd.grad(g, params, vl)
            for o, h in zip(out, hv):
                o.add_(h, alpha=len(Xb) / len(X))
        return out

    rows.append(
        dict(
            setting=setting,
            method="graph rebuilt per batch (autograd)",
            ms_per_product=_time(naive, reps=5),
        )
    )
    if ctx.get("pyh"):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(X, y), batch_size=len(X) // num_batches
        )
        obj, _ = peers.pyhessian_handle(model, loss_fn, None, None, dataloader=loader)
        rows.append(
            dict(
                setting=setting,
                method="pyhessian",
                ms_per_product=_time(lambda: obj.dataloader_hv_product(vl), reps=5),
            )
        )
        ctx["pyh"] = peers.pyhessian_handle(model, loss_fn, X, y)
    if ctx.get("curv"):
        Cb, _ = peers.curvlinops_operator(model, loss_fn, batches)
        rows.append(
            dict(
                setting=setting,
                method="curvlinops",
                ms_per_product=_time(lambda: Cb @ v, reps=5),
            )
        )
    return pd.DataFrame(rows)


# ---- report -----------------------------------------------------------------
def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}" if math.isfinite(x) else "-"
        return str(x)

    lines = [
        "| " + " | ".join(map(str, df.columns)) + " |",
        "|" + "---|" * len(df.columns),
    ]
    lines += [
        "| " + " | ".join(fmt(x) for x in row) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def summarize(frames, title="digits, 64-200-10 tanh MLP, D = 15,010") -> str:
    out = [f"# Hessian-free benchmark ({title})", ""]
    if "topk" in frames:
        df = frames["topk"]
        agg = (
            df.groupby(["k", "method"], sort=False)
            .agg(
                products_mean=("products", "mean"),
                products_max=("products", "max"),
                seconds=("seconds", "mean"),
                max_rel_err=("max_rel_err", "max"),
                runs=("seed", "count"),
            )
            .reset_index()
        )
        out += ["## Top-k eigenvalues (tol 1e-3, over seeds)", "", markdown(agg), ""]
    if "density" in frames:
        df = frames["density"]
        agg = df.groupby("method", sort=False).agg(
            products=("products", "mean"),
            l1_mean=("l1", "mean"),
            l1_std=("l1", "std"),
            seconds=("seconds", "mean"),
            runs=("seed", "count"),
        )
        if "l1_own_range" in df:
            agg["l1_own_range_mean"] = df.groupby("method", sort=False)[
                "l1_own_range"
            ].mean()
        out += [
            "## Spectral density (L1 to exact smoothed density, kernel var 1e-5)",
            "",
            markdown(agg.reset_index()),
            "",
        ]
    if "trace" in frames:
        df = frames["trace"]
        agg = df.groupby("method", sort=False).agg(
            products=("products", "mean"),
            rel_err_mean=("rel_err", "mean"),
            rel_err_max=("rel_err", "max"),
            seconds=("seconds", "mean"),
            runs=("seed", "count"),
        )
        out += ["## Trace (100 products)", "", markdown(agg.reset_index()), ""]
    if "speed" in frames:
        out += [
            "## Hessian-vector product speed (float32, CPU)",
            "",
            markdown(frames["speed"]),
            "",
        ]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks/hessianfree")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sections", default="speed,topk,density,trace")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-data", type=int, default=NUM_DATA)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    claim_folder(args.out)  # a second run on this folder is refused
    sections = args.sections.split(",")
    unknown = set(sections) - {"speed", "topk", "density", "trace"}
    if unknown:
        parser.error(
            f"--sections: unknown {sorted(unknown)}; choose from speed, topk, "
            "density, trace (comma-separated)."
        )
    seeds = list(range(args.seeds))

    size = dict(num_data=args.num_data, hidden=args.hidden, steps=args.steps)
    evals = exact_eigenvalues(args.out, **size)
    problem = make_problem(**size)
    model, loss_fn, X, y = problem
    ctx = dict(
        problem=problem, evals=evals, H=hf.HessianOperator(model, loss_fn, (X, y))
    )
    ctx["dref"] = density_reference(evals)
    ctx["pyh"] = peers.pyhessian_handle(model, loss_fn, X, y)
    ctx["curv"] = peers.curvlinops_operator(model, loss_fn, [(X, y)])
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        threads=args.threads,
        machine=platform.machine(),
        pyhessian=peers.version("pyhessian"),
        curvlinops=peers.version("curvlinops-for-pytorch"),
        lambda_max=float(evals.max()),
        lambda_min=float(evals.min()),
        trace=float(evals.sum()),
        **size,
    )
    title = (
        f"digits ({args.num_data}), 64-{args.hidden}-10 tanh MLP, "
        f"D = {ctx['H'].shape[0]:,}"
    )
    atomic_write_bytes(Path(args.out) / "env.json", json.dumps(env, indent=1).encode())
    notes = [
        f"- {name} not installed: skipped"
        for name, key in [("pyhessian", "pyh"), ("curvlinops-for-pytorch", "curv")]
        if ctx[key] is None
    ]

    frames = {}
    runners = dict(
        speed=lambda: bench_speed(ctx),
        topk=lambda: bench_topk(ctx, seeds),
        density=lambda: bench_density(ctx, seeds),
        trace=lambda: bench_trace(ctx, seeds),
    )
    for name in sections:
        start = time.perf_counter()
        frames[name] = runners[name]()
        write_table(frames[name], Path(args.out) / f"{name}.csv")
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s")
    text = (
        summarize(frames, title)
        + "\n"
        + "\n".join(notes)
        + "\n\nEnvironment: "
        + (json.dumps(env))
        + "\n"
    )
    atomic_write_bytes(Path(args.out) / "results.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
