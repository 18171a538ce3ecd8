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
    exact_eigenvalues,
    make_problem,
)
from tests.experiments.study_checks import assert_second_run_is_refused  # noqa: E402


@pytest.mark.slow  # ~11 s: the whole benchmark with its peers (full suite only, not `make test`)
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


TINY = dict(num_data=30, hidden=4, steps=2)


def _cut(path):
    path.write_bytes(path.read_bytes()[:-9])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated": _cut,
    "value changed": _flip,
    "record deleted": lambda p: p.with_suffix(".json").unlink(),
    "record damaged": lambda p: p.with_suffix(".json").write_text('{"key": {'),
    "pickle planted": lambda p: np.save(p, np.array([object()]), allow_pickle=True),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_eigenvalue_cache_is_recomputed(tmp_path, damage):
    evals = exact_eigenvalues(str(tmp_path), **TINY)
    (path,) = tmp_path.glob("*.npy")
    intact = path.read_bytes()
    DAMAGES[damage](path)
    with pytest.warns(UserWarning, match=f"{path.name}.*Recomputing it"):
        again = exact_eigenvalues(str(tmp_path), **TINY)
    np.testing.assert_array_equal(again, evals)
    assert path.read_bytes() == intact


def test_changed_size_gets_its_own_eigenvalues(tmp_path):
    evals = exact_eigenvalues(str(tmp_path), **TINY)
    wider = exact_eigenvalues(str(tmp_path), **{**TINY, "hidden": 5})
    assert len(wider) != len(evals)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    path = tmp_path / "exact_eigenvalues_seed0_n30_h4_s2.npy"
    other = tmp_path / "exact_eigenvalues_seed1_n30_h4_s2.npy"
    other.write_bytes(path.read_bytes())  # copied from another seed
    other.with_suffix(".json").write_bytes(path.with_suffix(".json").read_bytes())
    with pytest.warns(UserWarning, match="was computed for .*'seed': 0"):
        exact_eigenvalues(str(tmp_path), seed=1, **TINY)


def test_second_run_on_one_folder_is_refused(tmp_path):
    argv = ["--out", str(tmp_path), "--seeds", "1", "--num-data", "30"]
    assert_second_run_is_refused(lambda: run.main(argv), tmp_path)
