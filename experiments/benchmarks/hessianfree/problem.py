"""The benchmark problem: a tanh MLP on 1000 digits, briefly trained."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

NUM_DATA = 1000
HIDDEN = 200
STEPS = 200
LR = 0.5


def make_problem(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_data: int = NUM_DATA,
    hidden: int = HIDDEN,
    steps: int = STEPS,
):
    """Return ``(model, loss_fn, X, y)`` after 200 full-batch SGD steps.

    Digits (sklearn's embedded copy, 8x8 images scaled to [0, 1]), the first
    1000 images, a 64-200-10 tanh MLP (D = 15,010), cross-entropy ('mean').
    ``num_data``, ``hidden`` and ``steps`` shrink it (smoke test).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:num_data] / 16.0, dtype=dtype)
    y = torch.tensor(digits.target[:num_data], dtype=torch.long)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    model = model.to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, loss_fn, X, y


def dense_hessian(model, loss_fn, X, y, chunk: int = 200) -> torch.Tensor:
    """Exact float64 Hessian ``[D, D]`` via torch.func (vmapped HVPs in chunks)."""
    import copy

    from torch.func import functional_call, grad, jvp, vmap

    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for p in model64.parameters()]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])
    Xd = X.double()

    def loss(t):
        params = {n: c.reshape(s) for n, c, s in zip(names, t.split(sizes), shapes)}
        return loss_fn(functional_call(model64, params, (Xd,)), y)

    def hvp(v):
        return jvp(grad(loss), (theta,), (v,))[1]

    D = theta.numel()
    H = torch.empty(D, D, dtype=torch.float64)
    eye = torch.eye(D, dtype=torch.float64)
    for start in range(0, D, chunk):
        H[:, start : start + chunk] = vmap(hvp)(eye[start : start + chunk]).T
    return 0.5 * (H + H.T)


def exact_eigenvalues(out_dir: str, seed: int = 0, **size) -> np.ndarray:
    """Exact Hessian eigenvalues (ascending), cached in ``out_dir``.

    ``size`` (``num_data``, ``hidden``, ``steps``) is passed to
    :func:`make_problem`; a non-default size gets its own cache file.
    """
    default = dict(num_data=NUM_DATA, hidden=HIDDEN, steps=STEPS)
    size = {**default, **size}
    tag = "" if size == default else "_n{num_data}_h{hidden}_s{steps}".format(**size)
    path = os.path.join(out_dir, f"exact_eigenvalues_seed{seed}{tag}.npy")
    if os.path.exists(path):
        return np.load(path)
    model, loss_fn, X, y = make_problem(seed, **size)
    start = time.perf_counter()
    H = dense_hessian(model, loss_fn, X, y)
    print(f"dense Hessian {tuple(H.shape)} in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    evals = torch.linalg.eigvalsh(H).numpy()
    print(f"eigvalsh in {time.perf_counter() - start:.0f} s")
    os.makedirs(out_dir, exist_ok=True)
    np.save(path, evals)
    return evals
