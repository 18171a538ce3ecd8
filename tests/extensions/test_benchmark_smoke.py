"""Smoke test of the side-by-side benchmark (tiny problem, in-process runners)."""

import os

import pytest
import torch

from experiments.benchmarks.ggn import run
from experiments.benchmarks.ggn.measure import in_subprocess, time_job
from experiments.benchmarks.ggn.problems import make_problem
from experiments.benchmarks.ggn.runners import CONFIGS, make_runner, vivit_available

LIBS = ["vivitlib"] + (["vivit"] if vivit_available() else [])


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("library", LIBS)
def test_runner_on_digits(library, config):
    problem = make_problem("digits_mlp", 8)
    result = make_runner(library, config, problem)()
    tensors = list(_tensors(result))
    assert tensors and any(t.numel() > 0 for t in tensors), result
    assert all(bool(torch.isfinite(t).all()) for t in tensors)
    assert all(p.grad is not None for p in problem.params)


def _tensors(obj):
    """Every tensor inside a runner's (nested) result."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


@pytest.mark.skipif(not vivit_available(), reason="vivit-for-pytorch not installed")
@pytest.mark.parametrize("name", ["digits_mlp", "allcnn"])
def test_libraries_agree_on_eigenvalues(name):
    problem = make_problem(name, 8 if name == "digits_mlp" else 3)
    ours = make_runner("vivitlib", "eigvals", problem)()[0]
    theirs = make_runner("vivit", "eigvals", problem)()[0].flip(0)[: ours.numel()]
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-3, atol=1e-5)


def test_every_problem_builds():
    """Each problem gives a batch its model accepts and a finite loss."""
    from experiments.benchmarks.ggn.problems import PROBES, PROBLEMS

    for name in PROBLEMS + PROBES:
        if name == "resnet18":
            continue  # covered by tests/core/test_resnet18.py
        problem = make_problem(name, 2)
        loss = problem.loss_fn(problem.model(problem.X), problem.y)
        assert torch.isfinite(loss), name
    with pytest.raises(ValueError, match="Unknown problem"):
        make_problem("vgg16", 2)


def test_timing_and_table(tmp_path):
    job = dict(kind="time", problem="digits_mlp", batch_size=8, config="eigvals",
               threads=1, libraries=LIBS, repeats=1)  # fmt: skip
    times = time_job(job)
    rows = [
        dict(problem="p", N=8, config="gradient", grad_s=0.1, grad_MiB=1.0),
        dict(problem="p", N=8, config="eigvals",
             **{f"{lib}_s": times[lib]["median_s"] for lib in LIBS},
             **{f"{lib}_MiB": 2.0 for lib in LIBS}),
    ]  # fmt: skip
    df = run.summarise(rows, LIBS)
    assert df["vivitlib_x_grad_MiB"].item() == 2.0
    assert "| p | 8 | eigvals |" in run.to_markdown(df[["problem", "N", "config"]])


def test_memory_in_fresh_process():
    job = dict(kind="memory", problem="digits_mlp", batch_size=8, config="eigvals",
               threads=1, libraries=["vivitlib"])  # fmt: skip
    result = in_subprocess(job, timeout=120)
    assert result["ok"], result
    assert result["peak_mib"] >= 0


class _FakeProblem:
    """Records the calls of a memory job (runs, drops of .grad, resets)."""

    def __init__(self):
        self.calls = []

    def zero_grad(self):
        self.calls.append("zero_grad")


def _fake_memory_job(monkeypatch, reset_ok=True):
    from experiments.benchmarks.ggn import measure

    problem = _FakeProblem()
    run = lambda: problem.calls.append("run")  # noqa: E731

    def reset():
        problem.calls.append("reset")
        return 1.0 if reset_ok else None

    monkeypatch.setattr(measure, "_problem", lambda job: problem)
    monkeypatch.setattr(measure, "_runners", lambda job, p: {"x": run})
    monkeypatch.setattr(measure, "_reset_high_water_mark", reset)
    monkeypatch.setattr(measure, "_status_mib", lambda field: 3.0)
    return measure, problem


@pytest.mark.parametrize("warm", [False, True])
def test_memory_job_warms_up_before_the_reset_when_asked(monkeypatch, warm):
    measure, problem = _fake_memory_job(monkeypatch)
    result = measure.memory_job(dict(kind="memory", threads=1, warm=warm))
    assert result == {"ok": True, "peak_mib": 2.0, "baseline_mib": 1.0}
    warm_up = ["run", "zero_grad"] if warm else []
    assert problem.calls == [*warm_up, "reset", "run"]


def test_warm_memory_job_fails_without_the_reset(monkeypatch):
    measure, problem = _fake_memory_job(monkeypatch, reset_ok=False)
    result = measure.memory_job(dict(kind="memory", threads=1, warm=True))
    assert not result["ok"] and "clear_refs" in result["error"]
    # a first-pass job falls back to ru_maxrss
    assert measure.memory_job(dict(kind="memory", threads=1))["ok"]


def test_warm_up_objects_are_collected_before_the_reset(monkeypatch):
    """A warm-up collector kept alive by a reference cycle is gone at the reset."""
    import gc
    import weakref

    measure, problem = _fake_memory_job(monkeypatch)
    seen = {}

    class Cycle:
        pass

    def run():
        cycle = Cycle()
        cycle.self = cycle
        seen.setdefault("first", weakref.ref(cycle))

    monkeypatch.setattr(measure, "_runners", lambda job, p: {"x": run})

    def reset():
        seen["alive"] = seen["first"]() is not None
        return 1.0

    monkeypatch.setattr(measure, "_reset_high_water_mark", reset)
    gc.disable()
    try:
        measure.memory_job(dict(kind="memory", threads=1, warm=True))
    finally:
        gc.enable()
    assert seen["alive"] is False


def test_mmap_threshold_reaches_the_measuring_process(monkeypatch):
    import subprocess

    from experiments.benchmarks.ggn import measure

    envs = []

    def fake_run(cmd, env, **kwargs):
        envs.append(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": true}\n', stderr="")

    monkeypatch.setattr(measure.subprocess, "run", fake_run)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    job = dict(kind="memory", threads=1)
    assert measure.in_subprocess(dict(job, mmap_threshold=131072))["ok"]
    assert measure.in_subprocess(job)["ok"]
    assert envs[0]["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert "MALLOC_MMAP_THRESHOLD_" not in envs[1]


@pytest.mark.parametrize("steady", [False, True])
def test_memory_rows_measure_the_requested_pass(monkeypatch, tmp_path, steady):
    jobs = []

    def fake(job, timeout=None):
        jobs.append(job)
        if job["kind"] == "time":
            return {lib: {"median_s": 1.0} for lib in job["libraries"]}
        return {"ok": True, "peak_mib": 4.0}

    monkeypatch.setattr(run, "in_subprocess", fake)
    argv = ["--problems", "digits_mlp", "--sizes", "digits_mlp=8", "--configs",
            "gradient", "eigvals", "--repeats", "1", "--no-critical", "--no-vivit",
            "--no-floor", "--out", str(tmp_path)] + (["--steady-memory"] * steady)  # fmt: skip
    run.main(argv)
    memory = [job for job in jobs if job["kind"] == "memory"]
    assert memory and all(job["warm"] is steady for job in memory)
    which = "after a warm-up pass" if steady else "of the first pass"
    assert which in (tmp_path / "results.md").read_text()


def test_memory_trace_names_every_step_and_restores_the_hooks():
    from backpack.extensions.module_extension import ModuleExtension

    from experiments.benchmarks.ggn import memory_trace

    call = ModuleExtension.__call__
    rows = memory_trace.trace("digits_mlp", 8, "eigvals")
    assert ModuleExtension.__call__ is call
    steps = {(r["module"], r["step"]) for r in rows}
    assert {("Linear", "extension"), ("Linear", "hook"), ("Tanh", "extension")} <= steps
    assert rows[-1]["step"] == "pass"
    assert all(r["peak_after"] >= r["peak_before"] for r in rows)
    assert rows[-1]["peak_after"] == max(r["peak_after"] for r in rows)
    with pytest.raises(ValueError, match="config='eigvals'"):
        memory_trace.trace("digits_mlp", 8, "gradient")


def test_runner_passes_the_budget_on(monkeypatch):
    import vivitlib

    seen = []
    real = vivitlib.LowRankGGN

    def spy(*args, **kwargs):
        seen.append(kwargs.get("max_memory"))
        return real(*args, **kwargs)

    monkeypatch.setattr(vivitlib, "LowRankGGN", spy)
    problem = make_problem("digits_mlp", 8)
    budgeted = make_runner("vivitlib", "eigvals", problem, max_memory=1000)()
    default = make_runner("vivitlib", "eigvals", problem)()
    assert seen == [1000, None]
    torch.testing.assert_close(budgeted[0], default[0])
    with pytest.raises(ValueError, match="vivitlib option"):
        make_runner("torch", "gradient", problem, max_memory=1000)


def test_budget_table_marks_what_is_honoured(monkeypatch, tmp_path):
    """The budgets benchmark (in-process jobs with made-up peaks)."""
    from experiments.benchmarks.ggn import budgets

    def fake(job):
        assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "131072"
        if job["kind"] == "time":
            return {"vivitlib": {"median_s": 2.0 if job.get("max_memory") else 1.0}}
        warm = job.get("warm", False)
        if job["config"] == "gradient":
            return {"ok": True, "peak_mib": 5.0 if warm else 10.0}
        # first pass: within the limit at 1 x P, above it at 0.5 x P; after a
        # warm-up within P_steady + max_memory at both
        peaks = {None: 20.0, 1: 8.0} if warm else {None: 30.0, 1: 14.0}
        return {"ok": True,
                "peak_mib": peaks.get(job.get("max_memory"), 9.0 if warm else 16.0)}  # fmt: skip

    monkeypatch.setattr(budgets, "in_subprocess", fake)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    df = budgets.main(["--problems", "digits_mlp", "--sizes", "digits_mlp=8",
                       "--fractions", "0.5", "1", "--out", str(tmp_path)])  # fmt: skip
    assert list(df.budget) == ["none", "1 byte", "0.5 x P", "1 x P"]
    assert list(df.honoured) == ["", "", "no", "yes"]
    assert list(df.honoured_steady) == ["", "", "yes", "yes"]
    assert list(df.x_time) == [1.0, 2.0, 2.0, 2.0]
    assert list(df.plain_MiB) == [10.0] * 4 and list(df.plain_steady_MiB) == [5.0] * 4
    assert df.x_plain_steady.iloc[0] == pytest.approx(4.0)
    assert df.max_memory_MiB.iloc[3] == pytest.approx(10.0, rel=1e-6)
    assert "| digits_mlp |" in (tmp_path / "budgets.md").read_text()
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # set for the jobs only
