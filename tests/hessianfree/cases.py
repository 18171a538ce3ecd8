"""Small float64 problems and independent dense references via torch.func."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev


@dataclass
class Problem:
    """A model, a loss, the full data and the batches the operators see."""

    id: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor
    batch_size: int

    @property
    def batches(self) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.X.split(self.batch_size), self.y.split(self.batch_size)))

    def params(self) -> list[Tensor]:
        return list(self.model.parameters())


def _mlp(din: int, dh: int, dout: int, act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(din, dh), act(), nn.Linear(dh, dout)).double()


CASES = [
    dict(
        id="ce-mean-tanh",
        loss="ce",
        reduction="mean",
        act=nn.Tanh,
        n=13,
        bs=5,
        shape=(5, 4, 3),
        seed=0,
    ),
    dict(
        id="ce-sum-sigmoid",
        loss="ce",
        reduction="sum",
        act=nn.Sigmoid,
        n=11,
        bs=4,
        shape=(4, 3, 3),
        seed=1,
    ),
    dict(
        id="mse-mean-tanh",
        loss="mse",
        reduction="mean",
        act=nn.Tanh,
        n=9,
        bs=4,
        shape=(3, 4, 2),
        seed=2,
    ),
    dict(
        id="mse-sum-relu",
        loss="mse",
        reduction="sum",
        act=nn.ReLU,
        n=10,
        bs=10,
        shape=(3, 5, 2),
        seed=3,
    ),
]


def make_problem(case: dict) -> Problem:
    torch.manual_seed(case["seed"])
    din, dh, dout = case["shape"]
    model = _mlp(din, dh, dout, case["act"])
    X = torch.randn(case["n"], din, dtype=torch.float64)
    if case["loss"] == "ce":
        loss_fn = nn.CrossEntropyLoss(reduction=case["reduction"])
        y = torch.randint(0, dout, (case["n"],))
    else:
        loss_fn = nn.MSELoss(reduction=case["reduction"])
        y = torch.randn(case["n"], dout, dtype=torch.float64)
    return Problem(case["id"], model, loss_fn, X, y, case["bs"])


def _flat_fn(problem: Problem):
    names = [n for n, _ in problem.model.named_parameters()]
    shapes = [p.shape for p in problem.model.parameters()]
    sizes = [s.numel() for s in shapes]

    def unflat(theta: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}

    def out_fn(theta: Tensor, X: Tensor) -> Tensor:
        return functional_call(problem.model, unflat(theta), (X,))

    theta = torch.cat([p.detach().reshape(-1) for p in problem.model.parameters()])
    return theta, out_fn


def dense_hessian(problem: Problem) -> Tensor:
    theta, out_fn = _flat_fn(problem)
    return hessian(lambda t: problem.loss_fn(out_fn(t, problem.X), problem.y))(theta)


def dense_ggn(problem: Problem) -> Tensor:
    theta, out_fn = _flat_fn(problem)
    jac = jacrev(lambda t: out_fn(t, problem.X))(theta)  # [N, C, D]
    out = out_fn(theta, problem.X).detach()
    hess_out = hessian(lambda o: problem.loss_fn(o, problem.y))(out)  # [N,C,N,C]
    return torch.einsum("ncd,ncme,mef->df", jac, hess_out, jac)


def dense_empirical_fisher(problem: Problem) -> Tensor:
    theta, out_fn = _flat_fn(problem)
    rows = []
    for x, t in zip(problem.X, problem.y):

        def loss(th, x=x, t=t):
            return problem.loss_fn(out_fn(th, x[None]), t[None])

        rows.append(torch.func.grad(loss)(theta))
    grads = torch.stack(rows)
    scale = 1.0 / len(rows) if problem.loss_fn.reduction == "mean" else 1.0
    return scale * grads.T @ grads


DENSE = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_empirical_fisher}
