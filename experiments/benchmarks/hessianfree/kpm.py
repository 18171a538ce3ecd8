r"""Kernel polynomial method (KPM): a Chebyshev spectral density, to compare with SLQ.

Ghorbani et al. (2019) compare stochastic Lanczos quadrature (SLQ) with the
Chebyshev expansion of the spectral density (Lin, Saad & Yang, 2016). With the
spectrum mapped to ``[-1, 1]`` by ``Ã = (A − c)/h`` and Rademacher probes ``z``,

.. math::

    μ_k = \tfrac{1}{D}\, \mathbb{E}\, z^\top T_k(Ã)\, z, \qquad
    ρ(t) = \frac{1}{π \sqrt{1 - t^2}} \Big(g_0 μ_0 + 2 \sum_{k \geq 1} g_k μ_k T_k(t)
    \Big),

with the Jackson damping ``g_k`` that keeps the truncated series positive. The
Chebyshev vectors ``v_{k+1} = 2 Ã v_k − v_{k−1}`` give two moments per product
(``μ_{2k} = 2⟨v_k, v_k⟩ − μ_0``, ``μ_{2k+1} = 2⟨v_{k+1}, v_k⟩ − μ_1``). The range
``[c − h, c + h]`` comes from a short Lanczos run (its extreme Ritz values,
widened by a margin); its products are counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vivitlib import hessianfree as hf
from vivitlib.hessianfree._krylov import MatMat, rademacher


@dataclass(frozen=True)
class KPMDensity:
    """Chebyshev moments of a spectral density and the range they refer to.

    Attributes:
        moments: ``[M]`` estimated ``μ_k`` (float64).
        center: ``c`` of the map ``t = (λ − c) / h``.
        half_width: ``h``.
        num_products: Operator products, range estimate included.
    """

    moments: Tensor
    center: float
    half_width: float
    num_products: int

    def density(self, eigenvalues: np.ndarray) -> np.ndarray:
        """Jackson-damped density per unit eigenvalue at ``eigenvalues`` (0 outside)."""
        t = (np.asarray(eigenvalues, dtype=np.float64) - self.center) / self.half_width
        inside = np.abs(t) < 1
        values = np.zeros_like(t)
        values[inside] = chebyshev_density(self.moments.numpy(), t[inside])
        return values / self.half_width


def jackson(num_moments: int) -> np.ndarray:
    """Jackson damping factors ``g_0 … g_{M−1}``."""
    m = num_moments
    k = np.arange(m)
    q = math.pi / (m + 1)
    return ((m - k + 1) * np.cos(q * k) + np.sin(q * k) / np.tan(q)) / (m + 1)


def chebyshev_density(moments: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Evaluate the damped Chebyshev series of ``moments`` at ``t`` in ``(−1, 1)``."""
    damped = moments * jackson(len(moments))
    series = np.polynomial.chebyshev.chebval(
        t, damped * np.r_[1.0, 2 * np.ones(len(moments) - 1)]
    )
    return series / (math.pi * np.sqrt(1 - t**2))


def chebyshev_moments(
    matmat, probes: Tensor, center: float, half_width: float, num_moments: int
) -> Tensor:
    """Estimate ``μ_0 … μ_{M−1}`` of ``(A − c)/h`` with the given probes.

    Args:
        matmat: ``[D, P] -> [D, P]`` products with ``A`` (float64).
        probes: ``[D, P]`` probe vectors (Rademacher; the identity gives the exact
            moments).
        center: ``c``.
        half_width: ``h``.
        num_moments: ``M ≥ 2``.

    Returns:
        ``[M]`` moments, float64; ``⌊M/2⌋`` products per probe.

    """

    def scaled(v: Tensor) -> Tensor:
        return (matmat(v) - center * v) / half_width

    norm = probes.square().sum()  # D·P for Rademacher probes, D for the identity
    moments = torch.zeros(num_moments, dtype=torch.float64)
    previous, current = probes, scaled(probes)
    moments[0] = (previous * previous).sum() / norm
    moments[1] = (previous * current).sum() / norm
    k = 1
    while 2 * k < num_moments:
        inner = (current * current).sum() / norm
        moments[2 * k] = 2 * inner - moments[0]
        if 2 * k + 1 < num_moments:
            following = 2 * scaled(current) - previous
            cross = (following * current).sum() / norm
            moments[2 * k + 1] = 2 * cross - moments[1]
            previous, current = current, following
        k += 1
    return moments


def kpm_density(
    op: object,
    num_moments: int,
    num_probes: int,
    *,
    range_iters: int = 30,
    margin: float = 0.05,
    generator: torch.Generator | None = None,
) -> KPMDensity:
    """Estimate the spectral density of ``op`` by the kernel polynomial method.

    Args:
        op: Square symmetric operator (vivitlib operator, torch matrix, ...).
        num_moments: Chebyshev moments ``M`` (``≥ 2``).
        num_probes: Rademacher probes.
        range_iters: Lanczos steps for the spectral range. Default: ``30``.
        margin: Relative widening of the Ritz range on each side. Default:
            ``0.05``.
        generator: For the probes and the Lanczos start; default seeded with 0.

    Returns:
        The moments with their range and product count.

    Raises:
        ValueError: If ``num_moments < 2`` or ``num_probes < 1``.

    """
    if num_moments < 2 or num_probes < 1:
        raise ValueError(
            f"Need num_moments >= 2 and num_probes >= 1, got {num_moments} and "
            f"{num_probes}."
        )
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    matmat = MatMat(op)
    run = hf.lanczos(op, min(range_iters, matmat.dim), generator=generator)
    ritz = run.ritz()[0]
    low, high = ritz.min().item(), ritz.max().item()
    width = max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
    low, high = low - margin * width, high + margin * width
    center, half_width = 0.5 * (low + high), 0.5 * (high - low)
    probes = rademacher(matmat.dim, num_probes, generator, matmat.device)
    moments = chebyshev_moments(matmat, probes, center, half_width, num_moments)
    return KPMDensity(
        moments.cpu(), center, half_width, matmat.num_products + run.num_products
    )
