"""Measurements in fresh subprocesses: interleaved wall time, peak memory, limits.

Run as ``python -m experiments.benchmarks.ggn.measure '<json job>'``; the job's
result is printed as one JSON line. Each memory figure comes from its own
process: the resident-set high-water mark (``ru_maxrss``) after one pass minus
the mark after building model, data and runner. Memory limits for the
critical batch size are address-space limits (``RLIMIT_AS``) set to the
process's virtual size after set-up plus the budget.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[3]


def maxrss_mib() -> float:
    """High-water mark of this process's resident memory (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def _reset_high_water_mark() -> float | None:
    """Current resident memory (MiB) with the high-water mark reset to it.

    The set-up (imports, model, data) may pass through a transient peak; a
    pass measured against ``ru_maxrss`` after it would then read low (3C3D's
    plain gradient read 51 instead of 72 MiB whenever the parent process had
    imported pandas and the benchmark modules). ``None`` where the kernel does
    not offer the reset (``/proc/self/clear_refs``).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


def _vmsize_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not found in /proc/self/status.")


def _problem(job: dict[str, Any]):
    """The job's benchmark problem (model, loss, batch) on its device."""
    import torch

    torch.set_num_threads(job["threads"])
    from experiments.benchmarks.ggn.problems import make_problem

    return make_problem(
        job["problem"], job["batch_size"], job.get("seed", 0), _device(job)
    )


def _runners(job: dict[str, Any], problem) -> dict[str, Any]:
    """One runner per library of the job, on ``problem``."""
    from experiments.benchmarks.ggn.runners import make_runner

    budget = {"max_memory": job["max_memory"]} if job.get("max_memory") else {}
    return {
        lib: make_runner(lib, job["config"], problem, **budget)
        for lib in job["libraries"]
    }


def _setup(job: dict[str, Any]) -> dict[str, Any]:
    return _runners(job, _problem(job))


def _device(job: dict[str, Any]) -> str:
    return job.get("device", "cpu")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def time_job(job: dict[str, Any]) -> dict[str, Any]:
    """Warm up every library once, then time ``repeats`` interleaved rounds.

    The warm-up outputs of vivitlib and vivit (same seed, model and data) are
    compared (:mod:`.crosscheck`) and reported as ``agreement``: ``{"rel_diff": x}``.

    A library that fails (e.g. out of memory) is reported as ``{"error": ...}``
    and left out of the remaining rounds. On CUDA the device is synchronised
    around every run, and each library's peak allocated memory of one more pass
    (above what was allocated before it) is added as ``peak_mib``. Runners with
    a ``components`` attribute (the floor) get per-component medians.
    """
    device = _device(job)
    runners = _setup(job)
    failed: dict[str, str] = {}
    outputs: dict[str, Any] = {}
    for lib, run in runners.items():
        try:
            _seed(job)  # same MC samples for every library
            outputs[lib] = run()
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            failed[lib] = _error(err)
    agreement = _agreement(job["config"], outputs)
    live = {lib: run for lib, run in runners.items() if lib not in failed}
    times: dict[str, list[float]] = {lib: [] for lib in live}
    parts: dict[str, dict[str, list[float]]] = {lib: {} for lib in live}
    for _ in range(job["repeats"]):
        for lib, run in live.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[lib].append(time.perf_counter() - start)
            for name, value in getattr(run, "components", {}).items():
                parts[lib].setdefault(name, []).append(value)
    del outputs
    result: dict[str, Any] = {lib: {"error": msg} for lib, msg in failed.items()}
    if agreement is not None:
        result["agreement"] = agreement
    for lib, t in times.items():
        result[lib] = {"median_s": statistics.median(t), "runs_s": t}
        for name, values in parts[lib].items():
            result[lib][f"{name}_s"] = statistics.median(values)
        if device.startswith("cuda"):
            result[lib]["peak_mib"] = _cuda_peak_mib(live[lib])
    return result


def _seed(job: dict[str, Any]) -> None:
    import torch

    torch.manual_seed(job.get("seed", 0))


def _agreement(config: str, outputs: dict[str, Any]) -> dict[str, Any] | None:
    """Relative difference of vivitlib's and vivit's warm-up outputs, or ``None``."""
    if not {"vivitlib", "vivit"} <= set(outputs):
        return None
    from experiments.benchmarks.ggn.crosscheck import compare

    try:
        return {"rel_diff": compare(config, outputs["vivitlib"], outputs["vivit"])}
    except Exception as err:  # noqa: BLE001 - reported, not hidden
        return {"error": _error(err)}


def _cuda_peak_mib(run) -> float:
    """Peak allocated CUDA memory of one pass above the allocation before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memory_job(job: dict[str, Any]) -> dict[str, Any]:
    """Peak resident memory of one pass above the resident memory after set-up (MiB).

    The high-water mark is reset after set-up where the kernel allows
    (:func:`_reset_high_water_mark`), else the pass is measured against
    ``ru_maxrss`` after set-up.

    A first pass also pays one-time costs (library code paged in, allocator
    and oneDNN set-up: 40-60 MiB on the DeepOBS problems at ``N = 64``, for
    the plain gradient and vivitlib alike), which a training loop pays once.
    With ``job["warm"]`` one pass runs before the reset, and the peak is that
    of a later pass (what a training loop sees every step): the warm-up's
    ``.grad`` is dropped and its objects collected first, as a training loop
    drops them before the next backward pass. A warm job needs the reset
    (``ru_maxrss`` would hold the warm-up's peak) and fails without it.

    On CUDA: peak allocated device memory of a pass after one warm-up pass.
    """
    problem = _problem(job)
    (run,) = _runners(job, problem).values()
    if _device(job).startswith("cuda"):
        try:
            run()
            return {"ok": True, "peak_mib": _cuda_peak_mib(run)}
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            return {"ok": False, "error": _error(err)}
    limit = job.get("limit_mib")
    if limit is not None:
        budget = _vmsize_bytes() + int(limit * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
    if job.get("warm"):
        run()
        problem.zero_grad()
    gc.collect()
    baseline = _reset_high_water_mark()
    peak = lambda: _status_mib("VmHWM")  # noqa: E731
    if baseline is None and job.get("warm"):
        reason = "a warm job needs /proc/self/clear_refs (the high-water mark reset)"
        return {"ok": False, "error": f"{reason}; measure the first pass instead"}
    if baseline is None:
        baseline, peak = maxrss_mib(), maxrss_mib
    try:
        run()
    except (MemoryError, RuntimeError) as err:
        return {"ok": False, "error": str(err).splitlines()[0][:200]}
    return {"ok": True, "peak_mib": peak() - baseline, "baseline_mib": baseline}


def in_subprocess(job: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter; a crash reads as ``{"ok": False}``.

    ``job["mmap_threshold"]`` (bytes) sets glibc's ``MALLOC_MMAP_THRESHOLD_``
    for that interpreter: freed blocks above it leave the resident set.
    """
    threads = str(job["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONWARNINGS="ignore")  # fmt: skip
    if job.get("mmap_threshold") is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(job["mmap_threshold"])
    cmd = [sys.executable, "-m", "experiments.benchmarks.ggn.measure", json.dumps(job)]
    try:
        proc = subprocess.run(
            cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def largest_batch(
    library: str, base_job: dict[str, Any], limit_mib: float, start: int, stop: int
) -> int:
    """Largest ``N`` (within ``[start, stop]``, to 1/16 precision) fitting the limit.

    Doubles ``N`` from ``start`` until a pass fails, then bisects. Returns 0 if
    even ``start`` fails.
    """

    def fits(n: int) -> bool:
        job = dict(base_job, kind="memory", libraries=[library], batch_size=n,
                   limit_mib=limit_mib)  # fmt: skip
        return bool(in_subprocess(job).get("ok"))

    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None and good < stop:
        candidate = min(2 * good, stop)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    while bad is not None and bad - good > max(1, good // 16):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def main() -> None:
    """Subprocess entry: run the JSON job given as the only argument."""
    job = json.loads(sys.argv[1])
    result = time_job(job) if job["kind"] == "time" else memory_job(job)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
