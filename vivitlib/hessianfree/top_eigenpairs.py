r"""Top-k eigenpairs: thick-restart Lanczos with residual/gap error bounds.

:func:`topk_eigh` is thick-restart Lanczos (Wu & Simon, 2000) with full
reorthogonalization. After every product it computes the Ritz pairs
``(θ_i, y_i)`` of the projected matrix ``T = Qᵀ A Q`` and their residual
norms ``r_i = ‖A y_i − θ_i y_i‖ = β |s_{m,i}|`` (free of products), and bounds
the eigenvalue error by the smaller of the residual bound and the quadratic
gap bound (Parlett, *The Symmetric Eigenvalue Problem*, Thm. 11.7.1)

.. math:: |λ − θ_i| \le \min\left(r_i, \frac{r_i^2}{δ_i}\right),
   \qquad δ_i = \min_{j \ne i} \left(|θ_i − θ_j| − r_j\right),

where the gap ``δ_i`` to the rest of the spectrum is estimated from the other
Ritz values, widened by their residuals (not on the outer side, where Cauchy
interlacing already places eigenvalues beyond the outer Ritz values), and the
same bound is applied to small clusters of close Ritz values (see
:func:`_error_bounds`). It stops when every wanted bound is
at most ``tol·|θ_i|``. :func:`power_iteration` with deflation is the PyHessian
(Yao et al., 2020) baseline.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from vivitlib._checks import check_generator, check_int_at_least, check_positive_float
from vivitlib._warnings import DeprecatedAlias
from vivitlib.hessianfree._base import CurvatureOperator
from vivitlib.hessianfree._inputs import check_at_most_dim, check_vector, check_which
from vivitlib.hessianfree._krylov import MatMat, orthogonalize, random_unit


@dataclass(frozen=True)
class EighResult:
    """Eigenpairs with diagnostics; unpacks as ``evals, evecs = result``.

    The names follow :class:`vivitlib.GGNBlock` (``evals``, ``evecs``); the
    former ``eigenvalues``, ``eigenvectors`` and ``flat_eigenvectors`` still
    work but are deprecated (``DeprecationWarning``).

    Attributes:
        evals: ``[k]`` eigenvalues, descending.
        evecs: The eigenvectors, one tensor ``[k, *param.shape]`` per parameter
            (a single ``[k, D]`` tensor for operators without parameters).
        flat_evecs: ``[D, k]`` orthonormal columns, the same eigenvectors.
        residuals: ``[k]`` residual norms ``‖A y − θ y‖``.
        error_bounds: ``[k]`` bounds on ``|λ − θ|`` (see module docstring).
        converged: Whether every bound met the tolerance.
        num_products: Products with the operator.
        num_restarts: Thick restarts (0 for power iteration).
    """

    evals: Tensor
    evecs: list[Tensor]
    flat_evecs: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: bool
    num_products: int
    num_restarts: int = 0

    eigenvalues = DeprecatedAlias("evals")
    eigenvectors = DeprecatedAlias("evecs")
    flat_eigenvectors = DeprecatedAlias("flat_evecs")

    def __iter__(self):
        """Yield ``evals`` and ``evecs``."""
        yield self.evals
        yield self.evecs


def _select(theta: Tensor, num: int, which: str) -> Tensor:
    """Indices of the ``num`` wanted Ritz values, most wanted first."""
    key = {"largest": theta, "smallest": -theta, "magnitude": theta.abs()}[which]
    return torch.argsort(key, descending=True)[:num]


def _error_bounds(
    theta: Tensor, res: Tensor, idx: Tensor, which: str, max_cluster: int = 4
) -> Tensor:
    """Error bounds on the Ritz values ``theta[idx]``.

    For every cluster ``C`` of up to ``max_cluster`` consecutive Ritz values
    containing ``θ_i``, the quadratic residual bound (Kahan, Parlett & Jiang,
    1982; Mathias, 1998) gives ``|λ_i − θ_i| ≤ ‖R_C‖² / δ_C`` with residual
    norm ``‖R_C‖ = β ‖s_{m,C}‖`` and gap ``δ_C`` from the cluster to the other
    Ritz values, widened by their residuals (not on the outer side for
    ``largest``/``smallest``, where Cauchy interlacing already places
    eigenvalues beyond the outer Ritz values). The bound is the smallest of
    these and the residual ``r_i``.
    """
    order = torch.argsort(theta)
    th, r = theta[order], res[order]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    diff = (th[None] - th[:, None]).abs()  # [l, j]
    gaps = diff - r[None]
    if which == "largest":
        gaps = torch.where(th[None] > th[:, None], diff, gaps)
    elif which == "smallest":
        gaps = torch.where(th[None] < th[:, None], diff, gaps)
    n, bounds = len(th), []
    for i in rank[idx].tolist():
        best = r[i].item()
        for lo in range(max(0, i - max_cluster + 1), i + 1):
            for hi in range(i + 1, min(n, lo + max_cluster) + 1):
                outside = torch.cat([torch.arange(lo), torch.arange(hi, n)])
                if not len(outside):  # nothing seen beyond: no gap estimate
                    continue
                gap = gaps[lo:hi][:, outside].min().item()
                rc2 = (r[lo:hi] ** 2).sum().item()
                if gap > rc2**0.5:
                    best = min(best, rc2 / gap)
        bounds.append(best)
    return torch.tensor(bounds, dtype=torch.float64)


def _result(op, theta, vecs, res, bounds, converged, products, restarts) -> EighResult:
    order = torch.argsort(theta, descending=True)
    theta, vecs, res, bounds = theta[order], vecs[:, order], res[order], bounds[order]
    per_param = op.unflatten(vecs) if isinstance(op, CurvatureOperator) else [vecs.T]
    return EighResult(
        theta, per_param, vecs, res, bounds, converged, products, restarts
    )


def topk_eigh(
    op: object,
    k: int,
    *,
    which: str = "largest",
    tol: float = 1e-3,
    max_products: int | None = None,
    max_basis: int | None = None,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
) -> EighResult:
    """Top-k eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        op: Square symmetric operator, of any kind :func:`~.lanczos` accepts.
        k: Number of eigenpairs.
        which: ``'largest'`` (algebraic), ``'smallest'`` or ``'magnitude'``.
        tol: Relative tolerance: stop when ``bound_i ≤ tol·|θ_i|`` for all
            wanted pairs. Default ``1e-3``.
        max_products: Product budget, default ``max(300, 20 k)``.
        max_basis: Lanczos vectors kept before a thick restart, default
            ``max(2k + 10, k + 30)`` (capped at ``D``).
        generator: For the random start (and any restart after an invariant
            subspace); default a generator seeded with 0.
        v0: Start vector ``[D]`` instead of a random one.

    Returns:
        :class:`EighResult` with ``k`` eigenpairs, eigenvalues descending.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``k`` exceeds ``D``, ``max_products < k``, the operator
            gives NaN/Inf, or other arguments are invalid.
    """
    matmat = MatMat(op)
    theta, vecs, res, bounds, conv, restarts = _thick_restart(
        matmat, k, which, tol, max_products, max_basis, generator, v0
    )
    if not conv:
        warnings.warn(
            f"topk_eigh did not reach tol={tol} within {matmat.num_products} "
            "products; increase max_products or tol.",
            UserWarning,
            stacklevel=2,
        )
    return _result(op, theta, vecs, res, bounds, conv, matmat.num_products, restarts)


def _thick_restart(
    matmat,
    k,
    which,
    tol,
    max_products,
    max_basis,
    generator,
    v0,
    deflation: Tensor | None = None,
):
    """Thick-restart Lanczos on ``matmat``, optionally deflated.

    Runs in the complement of the orthonormal ``deflation`` basis if given.
    Returns Ritz values, vectors ``[D, k]``, residuals, bounds, converged flag
    and number of restarts.
    """
    dim = matmat.dim - (0 if deflation is None else deflation.shape[1])
    k = check_int_at_least(k, "k", 1)
    check_at_most_dim(k, "k", dim)
    which = check_which(which)
    tol = check_positive_float(tol, "tol")
    generator = check_generator(generator)
    if max_products is None:
        max_products = max(300, 20 * k)
    max_products = check_int_at_least(max_products, "max_products", 1)
    if max_products < k:
        raise ValueError(
            f"max_products={max_products} is smaller than k={k}: k eigenpairs need "
            "at least k products. Raise max_products or lower k."
        )
    if max_basis is None:
        max_basis = max(2 * k + 10, k + 30)
    max_basis = check_int_at_least(max_basis, "max_basis", k + 2)
    max_basis = min(max_basis, dim)
    product = matmat.project(deflation)
    dev = matmat.device

    def fresh(basis: Tensor) -> Tensor:
        return random_unit(matmat.dim, generator, dev, deflation, basis)[:, 0]

    Q = torch.zeros(matmat.dim, max_basis, dtype=torch.float64, device=dev)
    T = torch.zeros(max_basis, max_basis, dtype=torch.float64)
    if v0 is None:
        Q[:, 0] = fresh(Q[:, :0])
    else:
        q = orthogonalize(check_vector(v0, matmat.dim).to(Q)[:, None], deflation)
        Q[:, 0] = q[:, 0] / q.norm()
    n, restarts, scale = 1, 0, 0.0
    while True:
        j = n - 1
        w = product(Q[:, j : j + 1])[:, 0]
        h = Q[:, :n].T @ w
        w = w - Q[:, :n] @ h
        h2 = Q[:, :n].T @ w
        w = w - Q[:, :n] @ h2
        h = (h + h2).cpu()
        T[:n, j], T[j, :n] = h, h
        beta = w.norm().item()
        theta, S = torch.linalg.eigh(T[:n, :n])
        scale = max(scale, theta.abs().max().item(), beta)
        res = beta * S[n - 1].abs()
        idx = _select(theta, min(k, n), which)
        bounds = _error_bounds(theta, res, idx, which)
        invariant = beta <= 1e-10 * scale
        floor = torch.clamp(theta[idx].abs(), min=1e-12 * scale)
        # an invariant Krylov space hides the rest of the spectrum: go on
        done = (n == dim and invariant) or (
            not invariant and n >= k and bool((bounds <= tol * floor).all())
        )
        if done or matmat.num_products >= max_products:
            vecs = Q[:, :n] @ S[:, idx].to(dev)
            return theta[idx], vecs, res[idx], bounds, done, restarts
        if n == max_basis:
            keep = _select(theta, max(k, min(n - 1, (n + k) // 2)), which)
            Q[:, : len(keep)] = Q[:, :n] @ S[:, keep].to(dev)
            T.zero_()
            T[: len(keep), : len(keep)] = torch.diag(theta[keep])
            n, restarts = len(keep), restarts + 1
        if invariant:  # continue in the orthogonal complement
            Q[:, n] = fresh(Q[:, :n])
        else:
            Q[:, n] = w / beta
        n += 1


def power_iteration(
    op: object,
    k: int = 1,
    *,
    max_iters: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> EighResult:
    """Largest-magnitude eigenpairs by power iteration with deflation.

    The PyHessian baseline: for each eigenvalue, iterate ``v ← A v / ‖A v‖``
    with ``v`` kept orthogonal to the eigenvectors already found, until the
    Rayleigh quotient changes by less than ``tol`` relatively.

    Args:
        op: Square symmetric operator.
        k: Number of eigenpairs. Default 1.
        max_iters: Iterations per eigenpair. Default 100.
        tol: Relative change of the Rayleigh quotient to stop. Default ``1e-3``.
        generator: For the Rademacher start vectors; default seeded with 0.

    Returns:
        :class:`EighResult`; ``error_bounds`` are the residual norms. Where
        ``A`` vanishes on the remaining subspace the eigenvalue is 0.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``k`` exceeds ``D`` or the operator gives NaN/Inf.
    """
    matmat = MatMat(op)
    k = check_int_at_least(k, "k", 1)
    check_at_most_dim(k, "k", matmat.dim)
    max_iters = check_int_at_least(max_iters, "max_iters", 1)
    tol = check_positive_float(tol, "tol")
    generator = check_generator(generator)
    vecs = torch.zeros(matmat.dim, 0, dtype=torch.float64, device=matmat.device)
    thetas, residuals, all_converged, scale = [], [], True, 0.0
    for _ in range(k):
        v = random_unit(matmat.dim, generator, matmat.device, vecs)
        prev, converged = None, False
        for _ in range(max_iters):
            w = matmat(v)
            theta = (v * w).sum().item()
            residual = (w - theta * v).norm().item()
            scale = max(scale, w.norm().item())  # ‖A‖ estimate: no absolute floor
            floor = max(abs(theta if prev is None else prev), 1e-12 * scale)
            if prev is not None and abs(theta - prev) < tol * floor:
                converged = True
                break
            prev = theta
            w = orthogonalize(w, vecs)
            norm = w.norm().item()
            if norm <= 1e-12 * scale:  # A v = 0 in the complement: eigenvalue 0
                converged = True
                break
            v = w / norm
        all_converged &= converged
        thetas.append(theta)
        residuals.append(residual)
        vecs = torch.cat([vecs, v], 1)
    theta = torch.tensor(thetas, dtype=torch.float64)
    res = torch.tensor(residuals, dtype=torch.float64)
    return _result(
        op, theta, vecs, res, res.clone(), all_converged, matmat.num_products, 0
    )
