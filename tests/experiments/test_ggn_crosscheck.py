"""The GGN benchmark cross-checks vivitlib's and vivit's outputs in the same run."""

import pytest

from experiments.benchmarks.ggn.crosscheck import compare
from experiments.benchmarks.ggn.measure import time_job
from experiments.benchmarks.ggn.problems import make_problem
from experiments.benchmarks.ggn.runners import CONFIGS, make_runner, vivit_available

pytestmark = pytest.mark.skipif(
    not vivit_available(), reason="vivit-for-pytorch not installed"
)
#: float32 passes; the Newton step sums 1/(λ+δ) over directions down to 1e-4·λ_max
TOLERANCE = {"newton": 1e-3, "dirderiv_top10": 1e-4}


@pytest.mark.parametrize("config", CONFIGS[1:])
def test_timing_job_reports_agreement(config):
    job = dict(kind="time", problem="digits_mlp", batch_size=8, config=config,
               threads=1, libraries=["vivitlib", "vivit"], repeats=1)  # fmt: skip
    result = time_job(job)
    assert result["agreement"]["rel_diff"] < TOLERANCE.get(config, 1e-5)


@pytest.mark.parametrize("config", ["eigvals", "eigpairs_top10", "newton"])
def test_a_wrong_result_is_flagged(config):
    problem = make_problem("digits_mlp", 8)
    ours = make_runner("vivitlib", config, problem)()
    theirs = make_runner("vivit", config, problem)()
    if config == "eigvals":
        theirs = [theirs[0] * 1.01]
    elif config == "eigpairs_top10":
        evals, vecs = theirs
        vecs = [v.roll(1, dims=0) for v in vecs]  # eigenvectors mismatched
        theirs = (evals, vecs)
    else:
        theirs = [2 * t for t in theirs]
    assert compare(config, ours, theirs) > 5e-3
