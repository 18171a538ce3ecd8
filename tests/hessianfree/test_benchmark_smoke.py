"""Smoke test of the side-by-side benchmark script on a tiny problem."""

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pandas")

from experiments.benchmarks.hessianfree import run  # noqa: E402
from experiments.benchmarks.hessianfree.problem import (  # noqa: E402
    dense_hessian,
    make_problem,
)


def test_benchmark_runs_end_to_end(tmp_path):
    # 64-8-10 MLP on 60 digits: D = 610, dense reference in well under a second
    size = ["--num-data", "60", "--hidden", "8", "--steps", "5"]
    run.main(["--out", str(tmp_path), "--seeds", "1", *size])
    for name in ("topk", "density", "trace", "speed"):
        assert (tmp_path / f"{name}.csv").exists()
    text = (tmp_path / "results.md").read_text()
    assert "D = 610" in text and "## Trace" in text
    # a non-default size never overwrites the cached full-size reference
    assert not (tmp_path / "exact_eigenvalues_seed0.npy").exists()
    evals = np.load(tmp_path / "exact_eigenvalues_seed0_n60_h8_s5.npy")
    model, loss_fn, X, y = make_problem(num_data=60, hidden=8, steps=5)
    exact = np.linalg.eigvalsh(dense_hessian(model, loss_fn, X, y).numpy())
    np.testing.assert_allclose(evals, exact, rtol=1e-10, atol=1e-12)
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["trace"] == pytest.approx(exact.sum(), rel=1e-10)

    topk = pd.read_csv(tmp_path / "topk.csv")
    ours = topk[topk.method == "vivitlib topk_eigh"]
    assert set(ours.k) == {1, 5, 20}
    assert (ours.max_rel_err <= 1e-3).all()  # the stopping rule holds here too
    density = pd.read_csv(tmp_path / "density.csv")
    default = density[density.method.str.startswith("vivitlib default")]
    # 836 probe products plus the deflation (slower to converge on this tiny,
    # barely trained problem than the ~45 products on the full one)
    assert (default.products < 1000).all()
    assert (default.l1_own_range < 0.5).all()  # an L1 distance of densities: < 2
    trace = pd.read_csv(tmp_path / "trace.csv")
    krylov = trace[trace.method == "vivitlib krylov"]
    assert (krylov.products == 100).all() and (krylov.rel_err < 0.05).all()
