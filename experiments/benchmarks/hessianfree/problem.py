"""The benchmark problem: a tanh MLP on 1000 digits, briefly trained."""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.common.files import (
    CorruptFileError,
    atomic_write_bytes,
    read_bytes_or_none,
    sha256,
)

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
    :func:`make_problem`; a non-default size gets its own cache file. The cache
    ``exact_eigenvalues_seed<s>[_n.._h.._s..].npy`` is written atomically with a
    record ``.json`` (seed, size, shape, SHA-256); it is used only if both agree,
    otherwise it is recomputed with a warning.
    """
    default = dict(num_data=NUM_DATA, hidden=HIDDEN, steps=STEPS)
    size = {**default, **size}
    tag = "" if size == default else "_n{num_data}_h{hidden}_s{steps}".format(**size)
    path = Path(out_dir) / f"exact_eigenvalues_seed{seed}{tag}.npy"
    key = {"seed": seed, **size}
    try:
        cached = read_eigenvalues(path, key)
    except CorruptFileError as err:
        warnings.warn(f"{err} Recomputing it.", UserWarning, stacklevel=2)
        cached = None
    if cached is not None:
        return cached
    model, loss_fn, X, y = make_problem(seed, **size)
    start = time.perf_counter()
    H = dense_hessian(model, loss_fn, X, y)
    print(f"dense Hessian {tuple(H.shape)} in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    evals = torch.linalg.eigvalsh(H).numpy()
    print(f"eigvalsh in {time.perf_counter() - start:.0f} s")
    write_eigenvalues(path, key, evals)
    return evals


def write_eigenvalues(path: Path, key: dict, evals: np.ndarray) -> None:
    """Write ``evals`` to ``path`` (``.npy``) and then its record, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, evals, allow_pickle=False)
    data = buffer.getvalue()
    record = {"key": key, "shape": list(evals.shape), "sha256": sha256(data)}
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(record).encode())


def read_eigenvalues(path: Path, key: dict) -> np.ndarray | None:
    """The eigenvalues stored by :func:`write_eigenvalues`, verified.

    Returns:
        The eigenvalues, or ``None`` if neither the file nor its record exists.

    Raises:
        CorruptFileError: If the file or its record is damaged, incomplete or was
            computed for another problem size or seed.

    """
    data, raw = read_bytes_or_none(path), read_bytes_or_none(path.with_suffix(".json"))
    if data is None and raw is None:
        return None
    try:
        record = json.loads(raw) if raw is not None else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or data is None:
        raise CorruptFileError(
            f"Eigenvalue cache {path} or its record {path.with_suffix('.json')} is "
            "missing or damaged."
        )
    if record.get("key") != key:
        raise CorruptFileError(
            f"Eigenvalue cache {path} was computed for {record.get('key')}, not {key}."
        )
    if record.get("sha256") != sha256(data):
        raise CorruptFileError(f"Eigenvalue cache {path} is damaged (SHA-256 differs).")
    evals = np.load(io.BytesIO(data), allow_pickle=False)
    if list(evals.shape) != record.get("shape") or not np.isfinite(evals).all():
        raise CorruptFileError(f"Eigenvalue cache {path} does not hold its record.")
    return evals
