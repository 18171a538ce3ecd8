"""Study 3: critical batch size search, resume, and one real measurement."""

import pandas as pd

import experiments.scale.run as study
from experiments.scale.search import critical_batch_size, subprocess_measure
from tests.experiments.study_checks import (
    assert_second_run_is_refused,
    assert_truncated_table_is_recomputed,
    checked_tables,
)
from tests.experiments.utils import assert_finite, assert_resumes


def fake_measure(problem, method, device, threads, timeout):
    per_sample = {"gradient": 1e3}.get(method, 1e5)

    def measure(batch_size):
        return pd.DataFrame(
            {
                "peak_bytes": [per_sample * batch_size**2],
                "seconds": [0.0],
                "error": [""],
            }
        )

    return measure


def test_search_finds_largest_fitting_batch(tmp_path):
    measure = fake_measure("p", "ggn_exact", "cpu", 1, 1)
    n_crit, points, capped = critical_batch_size(
        measure,
        tmp_path,
        {"m": 1},
        1e5 * 100**2,
        start=8,
        max_batch=4096,
        resolution=0.0,
    )
    assert n_crit == 100 and not capped
    assert len(points) == len(set(points["batch_size"]))


def test_search_marks_a_result_at_the_cap(tmp_path):
    measure = fake_measure("p", "gradient", "cpu", 1, 1)
    n_crit, _, capped = critical_batch_size(
        measure, tmp_path, {"m": 2}, 1e3 * 10_000**2, start=8, max_batch=512
    )
    assert n_crit == 512 and capped


ARGV = [
    "--problem",
    "digits_logreg",
    "--methods",
    "gradient,ggn_exact",
    "--memory-budget-gb",
    str(1e5 * 64**2 / 2**30),
    "--device",
    "cpu",
    "--max-batch",
    "4096",
]


def test_scale_table_and_resume(monkeypatch, tmp_path):
    monkeypatch.setattr(study, "MEASURE", fake_measure)
    argv = [*ARGV]
    table = assert_resumes(
        monkeypatch, study.main, argv, tmp_path, study, "critical_batch_size", call=2
    )
    assert_finite(table, ["n_crit", "budget_gb", "max_batch"])
    assert not table["capped"].any()
    n_crit = table.set_index("method")["n_crit"]
    assert 56 <= n_crit["ggn_exact"] <= 64
    assert 560 <= n_crit["gradient"] <= 640
    assert (tmp_path / "ref" / "critical_batch_size.png").exists()


def test_real_measurement_in_subprocess():
    row = subprocess_measure("digits_logreg", "ggn_exact", "cpu")(8)
    assert row["error"].iloc[0] == ""
    assert row["peak_bytes"].iloc[0] >= 0 and row["seconds"].iloc[0] > 0


def test_truncated_measurement_is_recomputed_and_changed_option_is_new(
    monkeypatch, tmp_path
):
    calls = []

    def counting_measure(problem, method, device, threads, timeout):
        measure = fake_measure(problem, method, device, threads, timeout)
        return lambda batch_size: calls.append(timeout) or measure(batch_size)

    monkeypatch.setattr(study, "MEASURE", counting_measure)
    argv = [*ARGV, "--threads", "1", "--out", str(tmp_path)]
    table = pd.read_csv(study.main(argv)["table"])
    tables = checked_tables(tmp_path / "tables")
    assert len(calls) == len(tables)
    assert_truncated_table_is_recomputed(lambda: study.main(argv), tmp_path)
    assert len(calls) == len(tables) + 1
    again = pd.read_csv(study.main([*argv, "--timeout", "5"])["table"])
    pd.testing.assert_frame_equal(again, table)  # same fake numbers ...
    assert calls[-len(tables) :] == [5.0] * len(tables)  # ... measured anew
    assert len(checked_tables(tmp_path / "tables")) == 2 * len(tables)


def test_second_run_on_one_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(study, "MEASURE", fake_measure)
    argv = [*ARGV, "--out", str(tmp_path)]
    assert_second_run_is_refused(lambda: study.main(argv), tmp_path)


def test_unreadable_measurement_output_is_a_failure(monkeypatch):
    import experiments.scale.search as search

    class Done:
        returncode, stdout, stderr = 0, "garbage\n", ""

    monkeypatch.setattr(search.subprocess, "run", lambda *a, **k: Done)
    row = subprocess_measure("digits_logreg", "ggn_exact", "cpu")(8)
    assert row["error"].iloc[0].startswith("failed: unreadable output")
