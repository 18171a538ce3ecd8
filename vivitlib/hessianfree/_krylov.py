"""Small float64 helpers shared by the algorithms: products, probes, projections."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vivitlib._checks import check_finite
from vivitlib.hessianfree._base import CurvatureOperator
from vivitlib.hessianfree._inputs import check_square_operator

_OP_FIX = (
    "The algorithms need a finite operator: check the matrix (or, for a "
    "curvature operator, the parameters and data) for NaN/Inf."
)


def _check_dense(mat: Tensor) -> None:
    """Raise a ``ValueError`` if a dense matrix is not finite or not symmetric."""
    check_finite(mat, "The matrix op", _OP_FIX)
    scale = mat.abs().max().item() if mat.numel() else 0.0
    asym = (mat - mat.T).abs().max().item() if mat.numel() else 0.0
    if asym > 1e-8 * scale:
        raise ValueError(
            f"The matrix op is not symmetric: max |A - Aᵀ| = {asym:.2e} with max "
            f"|A| = {scale:.2e}. The algorithms assume a symmetric operator; pass "
            "(A + A.T) / 2 if that is what you mean."
        )


class MatMat:
    """Float64 ``[D, k] -> [D, k]`` products with any square operator, counted.

    Accepts a :class:`CurvatureOperator`, a dense torch matrix, a scipy
    ``LinearOperator`` (or numpy matrix), or any object with ``shape`` that
    supports ``op @ V`` for a torch ``[D, k]`` tensor.

    Attributes:
        dim: ``D``.
        device: Device of the vectors the algorithms keep.
        num_products: Products made through this wrapper.
    """

    def __init__(self, op: object) -> None:
        self.dim = check_square_operator(op)
        self.op = op
        self.num_products = 0
        if isinstance(op, CurvatureOperator):
            self.device = op.device
            self._fn: Callable[[Tensor], Tensor] = op.matmat
        elif isinstance(op, Tensor):
            self.device = op.device
            mat = op.detach().to(torch.float64)
            _check_dense(mat)
            self._fn = lambda V: mat @ V
        elif hasattr(op, "matmat") or isinstance(op, np.ndarray):
            self.device = torch.device("cpu")
            if isinstance(op, np.ndarray):
                _check_dense(torch.as_tensor(op, dtype=torch.float64))
            self._fn = self._numpy_product
        else:
            self.device = getattr(op, "device", torch.device("cpu"))
            self._fn = lambda V: (op @ V).to(torch.float64)

    def _numpy_product(self, V: Tensor) -> Tensor:
        out = self.op @ V.detach().cpu().numpy()
        return torch.as_tensor(np.asarray(out), dtype=torch.float64).reshape(V.shape)

    def __call__(self, V: Tensor) -> Tensor:
        """Return ``A V`` (float64, on ``self.device``) for ``V`` ``[D, k]``.

        Raises:
            ValueError: If the product has the wrong shape or holds NaN/Inf.
        """
        self.num_products += V.shape[1]
        out = self._fn(V).to(device=self.device, dtype=torch.float64)
        if out.shape != V.shape:
            raise ValueError(
                f"op returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(V.shape)}; op @ V must map [D, k] to [D, k]."
            )
        if not isinstance(self.op, CurvatureOperator):  # those check themselves
            check_finite(out, "A product of op", _OP_FIX)
        return out

    def project(self, basis: Tensor | None) -> Callable[[Tensor], Tensor]:
        """Return ``V ↦ P A P V`` with ``P = I - U Uᵀ`` for orthonormal ``U`` [D, r]."""
        if basis is None or basis.shape[1] == 0:
            return self

        def product(V: Tensor) -> Tensor:
            return orthogonalize(self(orthogonalize(V, basis)), basis)

        return product


def rademacher(dim: int, num: int, generator: torch.Generator, device) -> Tensor:
    """Return ``[dim, num]`` float64 Rademacher (±1) entries from ``generator``."""
    gen_device = generator.device
    signs = torch.randint(0, 2, (dim, num), generator=generator, device=gen_device)
    return (2.0 * signs.to(torch.float64) - 1.0).to(device)


def random_unit(
    dim: int, generator: torch.Generator, device, *bases: Tensor | None
) -> Tensor:
    """Return a random unit vector ``[dim, 1]`` orthogonal to orthonormal ``bases``.

    Rademacher draws can repeat (or lie in the span of) earlier vectors in small
    dimensions; such draws are redrawn, the last tries from a Gaussian.

    Raises:
        RuntimeError: If the bases already span the whole space.
    """
    for attempt in range(8):
        if attempt < 5:
            q = rademacher(dim, 1, generator, device)
        else:
            q = torch.randn(dim, 1, generator=generator, device=generator.device)
            q = q.to(device=device, dtype=torch.float64)
        for basis in bases:
            q = orthogonalize(q, basis)
        norm = q.norm()
        if norm > 1e-8 * dim**0.5:
            return q / norm
    raise RuntimeError("Could not draw a start vector outside the basis.")


def orthogonalize(V: Tensor, basis: Tensor | None, twice: bool = True) -> Tensor:
    """Remove from ``V`` [D, k] its components in the orthonormal ``basis`` [D, m].

    Classical Gram-Schmidt, repeated once (``twice``) for numerical safety.
    """
    if basis is None or basis.shape[1] == 0:
        return V
    V = V - basis @ (basis.T @ V)
    if twice:
        V = V - basis @ (basis.T @ V)
    return V


def tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    """Return the symmetric tridiagonal matrix ``[m, m]`` of Lanczos coefficients."""
    T = torch.diag(alphas)
    if betas.numel():
        T = T + torch.diag(betas, 1) + torch.diag(betas, -1)
    return T
