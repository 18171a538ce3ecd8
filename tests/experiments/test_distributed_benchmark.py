"""The data-parallel benchmark's stored measurements: validated, keyed, one writer.

The measurement itself (gloo processes) is replaced by a fake; what is checked is
that a stored measurement is reused only if complete and made with these options.
"""

import json

import pandas as pd
import pytest

import experiments.benchmarks.distributed.run as bench
from tests.experiments.study_checks import assert_second_run_is_refused


@pytest.fixture
def measurements(monkeypatch):
    calls = []

    def measure(world, args):
        calls.append((world, args.repeats))
        return {
            "ranks": world, "batch_size": args.batch_size, "compute": args.compute,
            "time_s": 0.5 / world + args.repeats, "peak_mib_per_rank": 10.25,
            "bytes_sent_per_rank": 1000 * world, "dense_v_bytes_per_rank": 4000,
            "K": 7, "per_layer_rank0": json.dumps([[[3, 2], "dense", 24, 24]]),
        }  # fmt: skip

    monkeypatch.setattr(bench, "measure", measure)
    return calls


def _argv(out, *more):
    return ["--ranks", "1", "2", "--batch-size", "8", "--out", str(out), *more]


def test_measurements_are_reused(tmp_path, measurements):
    rows = bench.main(_argv(tmp_path))
    assert measurements == [(1, 3), (2, 3)]
    assert bench.main(_argv(tmp_path)) == rows
    assert len(measurements) == 2
    table = pd.read_csv(tmp_path / "results.csv")
    assert table["time_s"].tolist() == [3.5, 3.25]
    assert "| 2 | 8 | eigenvalues | 3.25 |" in (tmp_path / "results.md").read_text()


def _cut(path):
    path.write_bytes(path.read_bytes()[:-20])


def _nan_time(path):
    record = json.loads(path.read_text())
    record["row"]["time_s"] = float("nan")
    path.write_text(json.dumps(record))


def _dropped_column(path):
    record = json.loads(path.read_text())
    del record["row"]["K"]
    path.write_text(json.dumps(record))


def _other_ranks(path):
    record = json.loads(path.read_text())
    record["row"]["ranks"] = 4
    path.write_text(json.dumps(record))


def _old_format(path):
    path.write_text(json.dumps(json.loads(path.read_text())["row"]))


DAMAGES = {
    "truncated": _cut,
    "NaN time": _nan_time,
    "column dropped": _dropped_column,
    "ranks changed": _other_ranks,
    "old format": _old_format,
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_measurement_is_measured_again(tmp_path, measurements, damage):
    rows = bench.main(_argv(tmp_path))
    (path,) = (tmp_path / "raw").glob("*_R2_*.json")
    intact = path.read_bytes()
    DAMAGES[damage](path)
    with pytest.warns(UserWarning, match=f"{path.name}.*Measuring it again"):
        assert bench.main(_argv(tmp_path)) == rows
    assert measurements == [(1, 3), (2, 3), (2, 3)]
    assert path.read_bytes() == intact


def test_changed_option_is_measured_anew(tmp_path, measurements):
    first = bench.main(_argv(tmp_path))
    changed = bench.main(_argv(tmp_path, "--repeats", "5"))
    assert measurements == [(1, 3), (2, 3), (1, 5), (2, 5)]
    assert [r["time_s"] for r in changed] != [r["time_s"] for r in first]
    assert bench.main(_argv(tmp_path)) == first
    assert len(measurements) == 4
    raw = tmp_path / "raw" / "3c3d_N8_eigenvalues_R2_repeats3.json"
    record = json.loads(raw.read_text())
    other = raw.with_name("3c3d_N8_eigenvalues_R2_repeats5.json")
    other.write_text(json.dumps(record))  # copied from another --repeats
    with pytest.warns(UserWarning, match="was made for .*'repeats': 3"):
        bench.main(_argv(tmp_path, "--repeats", "5"))


def test_second_run_on_one_folder_is_refused(tmp_path, measurements):
    assert_second_run_is_refused(lambda: bench.main(_argv(tmp_path)), tmp_path)
    assert measurements == []
