"""Trace estimation: Hutchinson, Hutch++ and Krylov-deflated Hutchinson.

- ``'hutchinson'`` (Hutchinson, 1989): ``tr(A) ≈ (1/n) Σ_p z_pᵀ A z_p`` with
  Rademacher probes.
- ``'hutch++'`` (Meyer, Musco, Musco & Woodruff, 2021): a third of the
  budget sketches ``A S``, ``Q = orth(A S)``, a third computes ``tr(QᵀAQ)``
  exactly and a third runs Hutchinson on ``(I − QQᵀ) A (I − QQᵀ)``.
- ``'krylov'`` (default): as Hutch++, but the deflation space is the Krylov
  space of a Lanczos run, whose ``tr(QᵀAQ) = Σ_j α_j`` comes without extra
  products and which captures the dominant (outlier) eigenvalues far better
  than one sketch step for the same number of products.

The confidence interval is Student-t on the Hutchinson part; the deflated part
is exact (up to round-off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vivitlib._checks import check_generator, check_int_at_least, check_positive_float
from vivitlib._warnings import DeprecatedAlias
from vivitlib.hessianfree._inputs import check_at_most_dim
from vivitlib.hessianfree._krylov import MatMat, orthogonalize, rademacher
from vivitlib.hessianfree.lanczos import _lanczos

METHODS = ("krylov", "hutch++", "hutchinson")


@dataclass(frozen=True)
class TraceEstimate:
    """Trace estimate with its uncertainty.

    Attributes:
        estimate: The trace estimate.
        std_error: Standard error of the stochastic part.
        confidence_interval: ``(lo, hi)`` at level ``confidence``.
        confidence: Level of the interval, e.g. 0.95.
        exact_part: ``tr(QᵀAQ)`` of the deflated subspace (0 for Hutchinson).
        samples: ``[n]`` Hutchinson samples ``zᵀ P A P z`` of the remainder.
        num_products: Products used.
        method: ``'krylov'``, ``'hutch++'`` or ``'hutchinson'``.
    """

    estimate: float
    std_error: float
    confidence_interval: tuple[float, float]
    confidence: float
    exact_part: float
    samples: Tensor
    num_products: int
    method: str

    def __float__(self) -> float:
        """Return the estimate."""
        return self.estimate


def hutchinson_trace(
    op: object,
    num_probes: int,
    *,
    method: str = "krylov",
    num_deflation: int | None = None,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Estimate ``tr(A)`` with ``num_probes`` products in total.

    Args:
        op: Square symmetric operator.
        num_probes: Total product budget ``n``: at least 2 for
            ``'hutchinson'``, 3 for ``'krylov'``, 4 for ``'hutch++'``.
        method: ``'krylov'`` (default), ``'hutch++'`` or ``'hutchinson'``.
        num_deflation: Products spent on the deflation space: Lanczos steps
            for ``'krylov'`` (default ``n // 3``), sketch size for ``'hutch++'``
            (default ``n // 3``, using twice that many products); at most ``D``.
        confidence: Level of the confidence interval. Default 0.95.
        generator: For all random vectors; default seeded with 0.

    Returns:
        A :class:`TraceEstimate`.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: For an unknown method, a budget that leaves fewer than
            two Hutchinson probes, ``num_deflation > D``, or NaN/Inf products.
    """
    matmat = MatMat(op)
    num_probes = check_int_at_least(num_probes, "num_probes", 1)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    confidence = check_positive_float(confidence, "confidence")
    if confidence >= 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    generator = check_generator(generator)
    dim, dev = matmat.dim, matmat.device
    smallest = {"hutchinson": 2, "krylov": 3, "hutch++": 4}[method]
    if num_probes < smallest:
        raise ValueError(
            f"num_probes={num_probes} is too small for method={method!r}, which "
            f"needs at least {smallest} products (2 Hutchinson probes for the "
            "confidence interval, after the deflation). Pass num_probes >= "
            f"{smallest}."
        )

    if method == "hutchinson" and num_deflation is not None:
        raise ValueError(
            "num_deflation has no effect with method='hutchinson' (no deflation); "
            "drop it or use method='krylov' or 'hutch++'."
        )
    basis, exact = None, 0.0
    if method != "hutchinson":
        cost_per = 1 if method == "krylov" else 2
        if num_deflation is None:
            m = min(max(1, num_probes // 3), dim, (num_probes - 2) // cost_per)
        else:
            m = check_int_at_least(num_deflation, "num_deflation", 1)
            check_at_most_dim(m, "num_deflation", dim)
            if num_probes - cost_per * m < 2:
                raise ValueError(
                    f"num_probes={num_probes} leaves fewer than 2 Hutchinson probes "
                    f"after a deflation with num_deflation={m} ({cost_per * m} "
                    "products); lower num_deflation or raise num_probes."
                )
        if method == "krylov":
            run = _lanczos(matmat, m, True, generator, None)
            basis, exact = run.basis, run.alphas.sum().item()
        else:
            sketch = matmat(rademacher(dim, m, generator, dev))
            basis, _ = torch.linalg.qr(sketch)
            exact = torch.trace(basis.T @ matmat(basis)).item()
    remaining = num_probes - matmat.num_products
    Z = orthogonalize(rademacher(dim, remaining, generator, dev), basis)
    samples = (Z * matmat(Z)).sum(0).cpu()
    mean = samples.mean().item()
    se = (samples.std() / remaining**0.5).item()
    from scipy.stats import t as student_t  # slow import: only when needed

    quantile = float(student_t.ppf(0.5 + 0.5 * confidence, remaining - 1))
    estimate = exact + mean
    return TraceEstimate(
        estimate=estimate,
        std_error=se,
        confidence_interval=(estimate - quantile * se, estimate + quantile * se),
        confidence=confidence,
        exact_part=exact,
        samples=samples,
        num_products=matmat.num_products,
        method=method,
    )


@dataclass(frozen=True)
class SketchResult:
    """Rademacher sketch ``Sᵀ A S`` (Yao et al., PyHessian report).

    Attributes:
        matrix: ``[s, s]`` symmetric sketch with ``S`` entries ``±1/√s``.
        evals: ``[s]`` eigenvalues of the sketch, descending; they tend to
            over-estimate the top eigenvalues of ``A``. (``eigenvalues`` is a
            deprecated alias.)
        trace: ``tr(Sᵀ A S)``, the Hutchinson estimate with ``s`` probes.
        num_products: ``s``.
    """

    matrix: Tensor
    evals: Tensor
    trace: float
    num_products: int

    eigenvalues = DeprecatedAlias("evals")


def sketch(
    op: object, size: int, *, generator: torch.Generator | None = None
) -> SketchResult:
    """Compute the Rademacher sketch ``Sᵀ A S`` with ``size`` products.

    ``S ∈ R^{D×s}`` has i.i.d. entries ``±1/√s``, so ``tr(SᵀAS)`` is the
    Hutchinson trace estimate with ``s`` probes and the sketch's eigenvalues
    estimate the top eigenvalues of ``A`` (biased upwards).

    Args:
        op: Square symmetric operator.
        size: Sketch size ``s`` (= products).
        generator: For ``S``; default seeded with 0.

    Returns:
        A :class:`SketchResult`.
    """
    matmat = MatMat(op)
    size = check_int_at_least(size, "size", 1)
    check_at_most_dim(size, "size", matmat.dim)
    S = rademacher(matmat.dim, size, check_generator(generator), matmat.device)
    S = S / size**0.5
    B = (S.T @ matmat(S)).cpu()
    B = 0.5 * (B + B.T)
    return SketchResult(
        matrix=B,
        evals=torch.linalg.eigvalsh(B).flip(0),
        trace=torch.trace(B).item(),
        num_products=size,
    )
