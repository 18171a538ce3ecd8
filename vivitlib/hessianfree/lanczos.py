"""Lanczos tridiagonalization of a symmetric operator (Lanczos, 1950).

Two variants: full reorthogonalization against all previous vectors (default,
stable, keeps the ``[D, m]`` basis), and the plain three-term recurrence that
keeps three vectors in memory (Papyan, 2019, *FastLanczos*) at the cost of
spurious copies of converged Ritz values — harmless for spectral densities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vivitlib._checks import check_generator, check_int_at_least
from vivitlib.hessianfree._inputs import check_at_most_dim, check_vector
from vivitlib.hessianfree._krylov import MatMat, orthogonalize, rademacher, tridiagonal


@dataclass(frozen=True)
class LanczosResult:
    """Output of :func:`lanczos`.

    Attributes:
        alphas: Diagonal of the tridiagonal matrix ``T``, ``[m]`` (float64).
        betas: Off-diagonal of ``T``, ``[m - 1]``.
        residual_norm: ``β_m``, norm of the residual after the last step;
            ``A Q = Q T + β_m q_{m+1} e_mᵀ``.
        basis: Orthonormal Lanczos vectors ``Q`` ``[D, m]``, or ``None`` without
            reorthogonalization.
        num_products: Products with the operator (``m``).
        breakdown: Whether an invariant subspace was found (``m < num_iters``).
    """

    alphas: Tensor
    betas: Tensor
    residual_norm: float
    basis: Tensor | None
    num_products: int
    breakdown: bool

    @property
    def tridiagonal(self) -> Tensor:
        """The ``[m, m]`` tridiagonal matrix ``T = Qᵀ A Q``."""
        return tridiagonal(self.alphas, self.betas)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``[m]`` (ascending) and eigenvectors ``[m, m]`` of ``T``."""
        return torch.linalg.eigh(self.tridiagonal)


def lanczos(
    op: object,
    num_iters: int,
    *,
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
) -> LanczosResult:
    """Run ``num_iters`` Lanczos steps on a symmetric operator.

    Args:
        op: Square symmetric operator (vivitlib operator, torch matrix, scipy
            ``LinearOperator``).
        num_iters: Number of steps ``m`` (= products), at most ``D``.
        reorthogonalize: Full reorthogonalization (Gram-Schmidt twice) against
            all previous Lanczos vectors. Default ``True``. ``False`` keeps
            three vectors and returns no basis.
        generator: Draws the Rademacher start vector when ``v0`` is ``None``;
            default a generator seeded with 0.
        v0: Start vector ``[D]`` (normalized internally).

    Returns:
        A :class:`LanczosResult`; stops early on breakdown (invariant subspace).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``num_iters`` exceeds ``D``, ``v0`` has a wrong shape,
            is zero or not finite, or the operator gives NaN/Inf.
    """
    matmat = op if isinstance(op, MatMat) else MatMat(op)
    return _lanczos(matmat, num_iters, reorthogonalize, generator, v0)


def _lanczos(
    matmat,
    num_iters: int,
    reorthogonalize: bool,
    generator: torch.Generator | None,
    v0: Tensor | None,
    deflation: Tensor | None = None,
) -> LanczosResult:
    """:func:`lanczos` on a :class:`MatMat`, optionally deflated.

    With ``deflation`` (orthonormal ``[D, r]``) it runs in its complement.
    """
    dim = matmat.dim
    num_iters = check_int_at_least(num_iters, "num_iters", 1)
    check_at_most_dim(num_iters, "num_iters", dim)
    product = matmat.project(deflation)
    if v0 is None:
        v0 = rademacher(dim, 1, check_generator(generator), matmat.device)[:, 0]
    else:
        check_vector(v0, dim)
    q = orthogonalize(
        v0.to(device=matmat.device, dtype=torch.float64)[:, None], deflation
    )[:, 0]
    norm = q.norm()
    if norm == 0:
        raise ValueError("v0 is zero (or lies in the deflated subspace).")
    q = q / norm
    basis = (
        torch.empty(dim, num_iters, dtype=torch.float64, device=matmat.device)
        if reorthogonalize
        else None
    )
    alphas, betas = [], []
    q_prev, beta = torch.zeros_like(q), 0.0
    scale = 0.0
    breakdown = False
    for j in range(num_iters):
        if reorthogonalize:
            basis[:, j] = q
        w = product(q[:, None])[:, 0]
        alpha = torch.dot(q, w).item()
        w = w - alpha * q - beta * q_prev
        if reorthogonalize:
            w = orthogonalize(w[:, None], basis[:, : j + 1])[:, 0]
        alphas.append(alpha)
        beta = w.norm().item()
        scale = max(scale, abs(alpha) + beta)
        if beta <= 1e-12 * scale:
            breakdown = j + 1 < num_iters
            break
        if j + 1 < num_iters:
            betas.append(beta)
        q_prev, q = q, w / beta
    m = len(alphas)
    return LanczosResult(
        alphas=torch.tensor(alphas, dtype=torch.float64),
        betas=torch.tensor(betas[: m - 1], dtype=torch.float64),
        residual_norm=beta,
        basis=basis[:, :m] if reorthogonalize else None,
        num_products=m,
        breakdown=breakdown,
    )
