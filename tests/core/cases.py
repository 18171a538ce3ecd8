"""Small float64 problems, as data, shared by the core tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from backpack import backpack, extend
from torch import nn

from tests.reference import DenseCurvature, dense_curvature


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.inner = nn.Linear(5, 5)
        self.act = nn.Tanh()
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.act(self.inner(x))
        return self.out(x)


def _mlp(d_in, d_hidden, d_out, act=nn.Tanh):
    return nn.Sequential(nn.Linear(d_in, d_hidden), act(), nn.Linear(d_hidden, d_out))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _adaptive_pool_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


def _grouped_dilated_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2, dilation=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(100, 3),
    )


def _conv_transpose():
    return nn.Sequential(
        nn.ConvTranspose2d(2, 3, 2, stride=2),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(108, 2),
    )


def _conv3d_avgpool():
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.AvgPool3d(2), nn.Flatten(), nn.Linear(16, 3)
    )


def _conv1d_seq():
    return nn.Sequential(nn.Conv1d(2, 3, 3, stride=2), nn.Sigmoid(), nn.Flatten(),
                         nn.Linear(12, 2))  # fmt: skip


def _avgpool_options():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Sigmoid(),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.Flatten(), nn.Linear(27, 3),
    )  # fmt: skip


def _avgpool1d_ceil():
    return nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.Tanh(), nn.AvgPool1d(3, stride=2, ceil_mode=True),
        nn.Flatten(), nn.Linear(12, 2),
    )  # fmt: skip


def _avgpool_divisor():
    return nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.ReLU(), nn.AvgPool2d(2, divisor_override=3),
        nn.Flatten(), nn.Linear(27, 3),
    )  # fmt: skip


def _sequence_linear():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


def _batchnorm():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _class_targets(n, c):
    return torch.randint(0, c, (n,))


def _with_ignored(targets, positions, ignore=-100):
    targets = targets.clone()
    targets.view(-1)[positions] = ignore
    return targets


def _class_weights():
    return torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)


CASES: list[dict[str, Any]] = [
    dict(id="mlp-ce-mean", model=lambda: _mlp(5, 4, 3), loss=nn.CrossEntropyLoss,
         x=(6, 5), y=lambda n: _class_targets(n, 3)),
    dict(id="mlp-ce-sum", model=lambda: _mlp(5, 4, 3),
         loss=lambda: nn.CrossEntropyLoss(reduction="sum"),
         x=(6, 5), y=lambda n: _class_targets(n, 3)),
    dict(id="mlp-mse-mean", model=lambda: _mlp(4, 5, 3, nn.Sigmoid), loss=nn.MSELoss,
         x=(5, 4), y=lambda n: torch.randn(n, 3)),
    dict(id="mlp-mse-sum", model=lambda: _mlp(4, 5, 3, nn.ReLU),
         loss=lambda: nn.MSELoss(reduction="sum"), x=(5, 4), y=lambda n: torch.randn(n, 3)),
    dict(id="cnn-ce", model=_cnn, loss=nn.CrossEntropyLoss, x=(4, 2, 6, 6),
         y=lambda n: _class_targets(n, 3)),
    dict(id="adaptive-pool-cnn-ce", model=_adaptive_pool_cnn, loss=nn.CrossEntropyLoss,
         x=(3, 2, 7, 7), y=lambda n: _class_targets(n, 3)),
    dict(id="grouped-dilated-conv-ce", model=_grouped_dilated_cnn,
         loss=nn.CrossEntropyLoss, x=(4, 2, 5, 5), y=lambda n: _class_targets(n, 3)),
    dict(id="conv-transpose-mse", model=_conv_transpose, loss=nn.MSELoss,
         x=(3, 2, 3, 3), y=lambda n: torch.randn(n, 2)),
    dict(id="conv3d-avgpool-ce-sum", model=_conv3d_avgpool,
         loss=lambda: nn.CrossEntropyLoss(reduction="sum"), x=(4, 1, 5, 5, 5),
         y=lambda n: _class_targets(n, 3)),
    dict(id="ce-sequence-output", model=lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1)),
         loss=nn.CrossEntropyLoss, x=(3, 3, 5), y=lambda n: torch.randint(0, 4, (n, 5))),
    dict(id="conv1d-mse", model=_conv1d_seq, loss=nn.MSELoss, x=(4, 2, 9),
         y=lambda n: torch.randn(n, 2)),
    dict(id="seq-linear-mse", model=_sequence_linear, loss=nn.MSELoss, x=(4, 2, 3),
         y=lambda n: torch.randn(n, 2)),
    dict(id="resnet-converter-ce", model=_Residual, loss=nn.CrossEntropyLoss, x=(5, 4),
         y=lambda n: _class_targets(n, 3), converter=True),
    dict(id="batchnorm-eval-ce", model=_batchnorm, loss=nn.CrossEntropyLoss, x=(5, 4),
         y=lambda n: _class_targets(n, 3)),
    dict(id="bce-logits", model=lambda: _mlp(4, 3, 1), loss=nn.BCEWithLogitsLoss,
         x=(5, 4), y=lambda n: torch.randint(0, 2, (n, 1)).double()),
    dict(id="avgpool-ceil-no-pad-count", model=_avgpool_options,
         loss=nn.CrossEntropyLoss, x=(3, 2, 7, 7), y=lambda n: _class_targets(n, 3)),
    dict(id="avgpool1d-ceil", model=_avgpool1d_ceil, loss=nn.MSELoss, x=(3, 2, 9),
         y=lambda n: torch.randn(n, 2)),
    dict(id="avgpool-divisor-override", model=_avgpool_divisor,
         loss=lambda: nn.CrossEntropyLoss(reduction="sum"), x=(3, 2, 7, 7),
         y=lambda n: _class_targets(n, 3)),
    # loss options: the curvature must follow exactly what the loss computes
    dict(id="ce-ignore-index-mean", model=lambda: _mlp(5, 4, 3), loss=nn.CrossEntropyLoss,
         x=(6, 5), y=lambda n: _with_ignored(_class_targets(n, 3), [1, 4])),
    dict(id="ce-ignore-index-sum", model=lambda: _mlp(5, 4, 3),
         loss=lambda: nn.CrossEntropyLoss(reduction="sum", ignore_index=2),
         x=(6, 5), y=lambda n: torch.tensor([0, 2, 1, 2, 0, 1])),
    dict(id="ce-class-weights", model=lambda: _mlp(5, 4, 3),
         loss=lambda: nn.CrossEntropyLoss(weight=_class_weights()),
         x=(6, 5), y=lambda n: torch.tensor([0, 1, 2, 1, 1, 0])),
    dict(id="ce-label-smoothing", model=lambda: _mlp(5, 4, 3),
         loss=lambda: nn.CrossEntropyLoss(label_smoothing=0.2), x=(6, 5),
         y=lambda n: _class_targets(n, 3)),
    dict(id="ce-weights-smoothing-ignore", model=lambda: _mlp(5, 4, 3),
         loss=lambda: nn.CrossEntropyLoss(weight=_class_weights(), label_smoothing=0.1),
         x=(6, 5), y=lambda n: _with_ignored(torch.tensor([0, 1, 2, 1, 1, 0]), [3])),
    dict(id="ce-probability-targets", model=lambda: _mlp(5, 4, 3),
         loss=nn.CrossEntropyLoss, x=(6, 5),
         y=lambda n: torch.softmax(torch.randn(n, 3), 1)),
    dict(id="ce-sequence-ignored-positions",
         model=lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1)),
         loss=lambda: nn.CrossEntropyLoss(weight=torch.tensor(
             [1.0, 0.5, 2.0, 1.5], dtype=torch.float64)), x=(3, 3, 5),
         y=lambda n: _with_ignored(torch.randint(0, 4, (n, 5)), [0, 1, 2, 3, 4, 7])),
]  # fmt: skip


@dataclass
class Problem:
    """A set-up problem: extended model and loss, one batch."""

    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def run(self, ggn) -> torch.Tensor:
        """One forward/backward pass collecting ``ggn``; returns the loss."""
        with backpack(*ggn.extensions, extension_hook=ggn.hook):
            loss = self.loss_fn(self.model(self.X), self.y)
            loss.backward()
        return loss

    def dense(self, params=None) -> DenseCurvature:
        return dense_curvature(self.model, self.loss_fn, self.X, self.y, params)


def make_problem(case: dict[str, Any], seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            model = case["model"]()
            X = torch.randn(*case["x"])
            y = case["y"](case["x"][0])
        finally:
            torch.set_default_dtype(torch.float32)
    model = model.double()
    model = extend(model, use_converter=case.get("converter", False))
    return Problem(model, extend(case["loss"]()), X, y)


CASE_IDS = [c["id"] for c in CASES]
