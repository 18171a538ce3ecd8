"""Training, checkpoint resume, result files and environment record."""

import json

import pandas as pd
import pytest
import torch

from experiments.common import cli
from experiments.common.results import cached_table, config_key, write_environment
from experiments.common.resumable import TrainConfig
from experiments.common.study import Run, train_and_evaluate, train_run
from experiments.common.training import Callback, batch_indices
from experiments.problems import get_problem
from experiments.problems.data import load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_batches_are_a_function_of_step():
    first = batch_indices(100, 32, 4, seed=1)
    assert torch.equal(first, batch_indices(100, 32, 4, seed=1))
    epoch = torch.cat([batch_indices(100, 32, s, seed=1) for s in range(3)])
    assert len(set(epoch.tolist())) == 96
    with pytest.raises(ValueError, match="exceeds"):
        batch_indices(10, 32, 0, seed=0)


def test_config_key_is_file_safe():
    assert config_key({"a": 1, "b": "x/y z"}) == "a=1_b=x-y-z"


def test_cached_table_skips_present_results(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"value": [0.1 + 0.2, 1e-300]})

    first = cached_table(tmp_path, {"run": 1}, compute)
    second = cached_table(tmp_path, {"run": 1}, compute)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, second)
    assert first["value"][0] == 0.1 + 0.2 and list(first.columns) == ["run", "value"]


def test_environment_record(tmp_path):
    path = write_environment(tmp_path, {"problem": "digits_mlp", "steps": [1, 2]})
    record = json.loads(path.read_text())
    assert record["torch"] == torch.__version__
    assert record["arguments"]["steps"] == [1, 2]


def _evaluate(model, loss_fn, step):
    x, y = load_digits().split("test")
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return pd.DataFrame(
        {"loss": [loss_fn(model(x), y).item()], "param_norm": [params.norm().item()]}
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_interrupted_training_resumes_to_same_table(
    tmp_path, digits, monkeypatch, optimizer
):
    config = TrainConfig(optimizer, lr=0.01, batch_size=32, num_steps=60)
    problem, steps = get_problem("digits_mlp"), [0, 20, 60]
    reference = train_and_evaluate(
        Run(problem, digits, config, tmp_path / "ref"), steps, _evaluate, progress=False
    )

    class Interrupt(Callback):
        def after_step(self, state):
            if state.step == 35:
                raise KeyboardInterrupt

    run = Run(problem, digits, config, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train_run(run, steps, progress=False, callbacks=[Interrupt()])
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == [
        "step0000000.pt",
        "step0000020.pt",
    ]
    resumed = train_and_evaluate(run, steps, _evaluate, progress=False)

    pd.testing.assert_frame_equal(reference, resumed)
    assert resumed["loss"].iloc[-1] < resumed["loss"].iloc[0]
    logs = list((tmp_path / "resumed" / "logs").glob("*.csv"))
    assert len(pd.read_csv(logs[0])) == 60


def _parse(*argv):
    parser = cli.base_parser("x", "test")
    cli.add_training_args(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be between 1 and the 1437"),
        (["--batch-size", "5000"], "--batch-size must be between"),
        (["--epochs", "nan"], "--epochs must be a finite number"),
        (["--epochs", "-1"], "--epochs must be a finite number"),
        (["--optimizers", "sgd,lbfgs"], "--optimizers must be .*'sgd,lbfgs'"),
        (["--optimizers", ","], "--optimizers must be"),
        (["--lr-sgd", "0"], "lr must be a finite number > 0, got 0.0"),
        (["--lr-sgd", "nan"], "lr must be a finite number > 0"),
        (["--lr-adam", "-1", "--optimizers", "adam"], "lr must be a finite number"),
        (["--seed", "-3"], "seed must be >= 0"),
    ],
)
def test_training_options_are_validated(digits, argv, message):
    with pytest.raises(ValueError, match=message):
        cli.make_runs(_parse(*argv), get_problem("digits_mlp"), digits)


def test_zero_is_an_option_value_not_the_default(digits):
    (run,) = cli.make_runs(
        _parse("--epochs", "0", "--optimizers", "sgd"),
        get_problem("digits_mlp"),
        digits,
    )
    assert run.train_config.num_steps == 0


def test_held_out_batch_and_steps_are_validated(digits):
    with pytest.raises(ValueError, match="between 1 and the 360 test samples"):
        cli.held_out_batch(_parse("--eval-batch-size", "1000"), digits)
    with pytest.raises(ValueError, match="between 1 and"):
        cli.held_out_batch(_parse("--eval-batch-size", "0"), digits)
    assert len(cli.held_out_batch(_parse("--eval-batch-size", "360"), digits)[1]) == 360
    assert cli.parse_steps("40, 0,20,20") == [0, 20, 40]
    for text in ("a,b", "-5,3", ""):
        with pytest.raises(ValueError, match="--steps must be comma-separated"):
            cli.parse_steps(text)
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        cli.setup(_parse("--threads", "0"))
