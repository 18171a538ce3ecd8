"""``max_memory=`` bounds the budget-dependent part of a pass's peak (issue 13).

Each peak is the resident high-water mark of one pass in a fresh process, with
glibc's mmap threshold fixed at 128 KiB so that freed buffers leave the
resident set (as in ``experiments.benchmarks.ggn.memory_trace``). A pass with a
1-byte budget gives the floor (forward activations, BackPACK's stored inputs,
unfolded inputs, masks, the Gram): a pass with budget ``B`` may exceed it by at
most ``B``, while the default pass lies well above (it keeps the 20 MiB factor
behind the first max pooling lazy too, since ``DEFAULT_LAZY_BYTES`` is 16 MiB,
but forms column chunks of 8 MiB, kernel slices of up to 32 MiB and every
unfolded input whole: 53 against 35 MiB for an 8 MiB budget).
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
N = 32


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark() -> float:
    """Reset the resident high-water mark to the current RSS (MiB), so that the
    peak of imports and set-up does not hide the pass's own peak."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _pass(budget: str) -> dict:
    """One eigenvalue pass on a small CIFAR-shaped CNN; peak above set-up (MiB)."""
    import torch
    from backpack import backpack, extend
    from torch import nn

    import vivitlib

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = extend(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 10),
    ))  # fmt: skip
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(N, 3, 32, 32), torch.randint(0, 10, (N,))
    ggn = vivitlib.LowRankGGN(
        model.parameters(),
        compute="eigenvalues",
        max_memory=None if budget == "none" else budget,
    )
    base = _reset_high_water_mark()
    with warnings.catch_warnings(), backpack(*ggn.extensions, extension_hook=ggn.hook):
        warnings.simplefilter("ignore")
        loss_fn(model(X), y).backward()
    evals = ggn.blocks[0].evals
    peak = _status_mib("VmHWM") - base
    return {"peak": peak, "evals": evals[:5].tolist()}


def _peak_in_subprocess(budget: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "tests.core.test_max_memory_peak", budget]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_budget_bounds_the_peak_above_the_floor():
    floor = _peak_in_subprocess("1")
    budget = 8 * 2**20
    budgeted = _peak_in_subprocess(str(budget))
    default = _peak_in_subprocess("none")
    assert budgeted["evals"] == pytest.approx(default["evals"], rel=1e-6)
    assert budgeted["peak"] <= floor["peak"] + budget / 2**20
    # the default's larger chunks and slices (53 vs 35 MiB when written)
    assert default["peak"] >= budgeted["peak"] + 10


if __name__ == "__main__":
    print(json.dumps(_pass(sys.argv[1])))
