"""Data sets and the problem registry."""

import pytest
import torch
from backpack import backpack
from backpack.extensions import SqrtGGNExact

from experiments.problems import PROBLEMS, get_problem, make_extended
from experiments.problems.data import load_data, load_digits


def test_digits_split_and_normalisation():
    data = load_digits()
    assert data.input_shape == (1, 8, 8)
    assert len(data.train_y) == 1437 and len(data.test_y) == 360
    assert data.train_x.mean().abs() < 1e-5
    assert abs(data.train_x.std().item() - 1.0) < 1e-4
    assert set(data.train_y.unique().tolist()) == set(range(10))
    again = load_digits()
    assert torch.equal(data.test_x, again.test_x)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_files_say_how_to_get_them(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="never downloads.*--data-dir"):
        load_data(name, tmp_path)


def test_torchvision_sets_need_data_dir():
    with pytest.raises(ValueError, match="--data-dir"):
        load_data("cifar10")
    with pytest.raises(ValueError, match="Unknown data set"):
        load_data("imagenet", "/tmp")


def test_unknown_problem():
    with pytest.raises(ValueError, match="digits_mlp"):
        get_problem("nope")


def test_3c3d_has_deepobs_parameter_count():
    model = get_problem("cifar10_3c3d").make_model()
    assert sum(p.numel() for p in model.parameters()) == 895_210
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def _shape(name):
    return {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}.get(
        PROBLEMS[name].dataset, (1, 28, 28)
    )


@pytest.mark.parametrize(
    "name",
    [n for n in PROBLEMS if n != "cifar10_resnet18"]
    + [pytest.param("cifar10_resnet18", marks=pytest.mark.slow)],
)
def test_models_run_under_backpack_second_order(name):
    problem = get_problem(name)
    model, loss_fn = make_extended(problem, _shape(name), 10)
    inputs, labels = torch.randn(2, *_shape(name)), torch.tensor([0, 3])
    with backpack(SqrtGGNExact()):
        loss_fn(model(inputs), labels).backward()
    for param in model.parameters():
        assert param.sqrt_ggn_exact.shape == (10, 2, *param.shape)
