"""The benchmark's floor, device options and Gram-kernel timer on tiny problems."""

import pytest
import torch
from backpack import extend
from torch import nn

from experiments.benchmarks.ggn import gram_kernel, measure, run
from experiments.benchmarks.ggn.floor import gram_macs, lift_macs
from experiments.benchmarks.ggn.problems import Problem, make_problem
from experiments.benchmarks.ggn.runners import make_runner

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def test_gram_macs_of_an_mlp():
    # C = 10, N = 8 (80 columns); linear weights: (CN)²·O/2 + N²·I/2,
    # biases: (CN)²·O/2
    expected = (6400 * 128 // 2 + 64 * 64 // 2) + 6400 * 128 // 2
    expected += (6400 * 10 // 2 + 64 * 128 // 2) + 6400 * 10 // 2
    assert gram_macs(make_problem("digits_mlp", 8)) == expected


def test_gram_macs_of_a_convolution_takes_the_cheaper_plan():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(),
                                 nn.Linear(12, 4, bias=False)))  # fmt: skip
    problem = Problem("tiny", model, extend(nn.CrossEntropyLoss()),
                      torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,)))  # fmt: skip
    C, N, T, O, I = 4, 5, 4, 3, 18  # noqa: E741
    dense = C * N * T * O * I + (C * N) ** 2 * O * I // 2
    pairwise = (N * T) ** 2 * (I + C * O) // 2 + (N * C) ** 2 * T * O // 2
    conv = min(dense, pairwise) + (C * N) ** 2 * O // 2  # weight + bias
    linear = (C * N) ** 2 * 4 // 2 + N**2 * 12 // 2
    assert gram_macs(problem) == conv + linear


def test_floor_runner_times_its_parts():
    problem = make_problem("digits_mlp", 8)
    floor = make_runner("floor", "eigvals", problem)
    parts = floor()
    assert set(parts) == {"grad", "vjp", "gram", "eigvalsh"}
    assert all(t >= 0 for t in parts.values())
    assert all(p.grad is not None for p in problem.params)


def test_lift_macs_of_an_mlp():
    # C = 10, N = 8: weights C·N·O + N·O·I, biases C·N·O
    expected = (80 * 128 + 8 * 128 * 64) + 80 * 128
    expected += (80 * 10 + 8 * 10 * 128) + 80 * 10
    assert lift_macs(make_problem("digits_mlp", 8)) == expected


def test_lift_macs_of_a_convolution_counts_positions():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()))
    problem = Problem("tiny", model, extend(nn.CrossEntropyLoss()),
                      torch.randn(5, 2, 4, 4), torch.randint(0, 12, (5,)))  # fmt: skip
    C, N, T, O, I = 12, 5, 4, 3, 18  # noqa: E741
    assert lift_macs(problem) == C * N * T * O + N * T * O * I + C * N * O


def test_full_floor_runner_times_eigh_and_the_newton_work():
    problem = make_problem("digits_mlp", 8)
    floor = make_runner("floor_full", "newton", problem)
    parts = floor()
    assert list(parts) == ["grad", "vjp", "gram", "newton", "eigh"]
    assert all(t >= 0 for t in parts.values())
    assert floor.lift_macs == 2 * lift_macs(problem)


def test_time_job_reports_floor_parts_and_failures(monkeypatch):
    def broken(*args):
        raise RuntimeError("out of memory\nmore")

    original = measure._setup

    def setup(job):
        runners = original(job)
        runners["vivit"] = broken
        return runners

    monkeypatch.setattr(measure, "_setup", setup)
    job = dict(kind="time", problem="digits_mlp", batch_size=8, config="eigvals",
               threads=1, libraries=["vivitlib", "floor"], repeats=1)  # fmt: skip
    result = measure.time_job(job)
    assert result["vivit"] == {"error": "RuntimeError: out of memory"}
    assert result["floor"]["vjp_s"] > 0 and result["vivitlib"]["median_s"] > 0


def test_summary_divides_every_config_by_the_floor():
    rows = [
        dict(problem="p", N=8, config="gradient", grad_s=0.1, grad_MiB=1.0),
        dict(problem="p", N=8, config="eigvals", vivitlib_s=0.4, vivitlib_MiB=2.0,
             floor_s=0.2),
        dict(problem="p", N=8, config="newton", vivitlib_s=0.6, vivitlib_MiB=3.0),
    ]  # fmt: skip
    df = run.summarise(rows, ["vivitlib"]).set_index("config")
    assert df.loc["eigvals", "vivitlib_x_floor"] == pytest.approx(2.0)
    assert df.loc["newton", "vivitlib_x_floor"] == pytest.approx(3.0)


def test_summary_divides_full_compute_by_the_full_floor():
    rows = [
        dict(problem="p", N=8, config="gradient", grad_s=0.1, grad_MiB=1.0),
        dict(problem="p", N=8, config="eigvals", vivitlib_s=0.4, floor_s=0.2),
        dict(problem="p", N=8, config="newton", vivitlib_s=0.6, floor_full_s=0.4),
    ]
    df = run.summarise(rows, ["vivitlib"]).set_index("config")
    assert df.loc["newton", "vivitlib_x_floor"] == pytest.approx(3.0)
    assert df.loc["newton", "vivitlib_x_floor_full"] == pytest.approx(1.5)
    assert df.loc["eigvals", ["vivitlib_x_floor_full"]].isna().all()


def test_sizes_option_and_vivit_limit():
    args = run.parse_args(["--sizes", "resnet18=8,32", "--no-vivit"])
    assert args.sizes == {"resnet18": (8, 32)}
    args.libraries = ["vivitlib", "vivit"]
    assert run._row_libraries(args, "resnet18", 32, "eigvals") == ["vivitlib", "floor"]
    assert run._row_libraries(args, "resnet18", 8, "newton") == [
        "vivitlib",
        "vivit",
        "floor_full",
    ]
    assert run._row_libraries(args, "resnet18", 8, "eigvals_mc1") == [
        "vivitlib",
        "vivit",
    ]


def test_gram_kernel_timer_runs(capsys):
    medians = gram_kernel.main(["--batch-sizes", "2", "--repeats", "1"])
    assert set(medians) == {(2, "gram", "current"), (2, "gram+vtg", "current")}
    assert "N=2 gram" in capsys.readouterr().out


def test_backprop_rules_timer_runs(capsys):
    from experiments.benchmarks.ggn import backprop_rules

    rows = backprop_rules.main(["--batch-size", "2", "--repeats", "1", "--whole-pass"])
    assert [r[0].split()[1] for r in rows][:2] == ["ReLU", "MaxPool2d"]
    assert "eigenvalue pass" in capsys.readouterr().out
