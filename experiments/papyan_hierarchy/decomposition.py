r"""Papyan's class-mean / within-class split of the cross-entropy GGN, in Gram space.

Papyan (2019, *The full spectrum of deepnet Hessians at scale*, Appendix A) writes
the GGN of a cross-entropy batch with ``N`` samples as

.. math::

    G = \frac{1}{N} \sum_{n, c'} p_{nc'}\, g_{nc'} g_{nc'}^\top,
    \qquad g_{nc'} = J_n^\top (e_{c'} - p_n),

and splits it into class means and covariances (``y_n`` the label of sample ``n``,
``P_{cc'} = \sum_{n: y_n = c} p_{nc'}``, ``g_{cc'}`` the ``p``-weighted mean of
``g_{nc'}`` over class ``c``, ``g_c`` the ``P``-weighted mean of ``g_{cc'}`` over
``c' \neq c``, ``P_c = \sum_{c' \neq c} P_{cc'}``):

.. math::

    A_1 = \tfrac{1}{N} \sum_c P_c g_c g_c^\top, \quad
    A_2 = \tfrac{1}{N} \sum_c P_{cc} g_{cc} g_{cc}^\top, \quad
    B_1 = \tfrac{1}{N} \sum_{c' \neq c} P_{cc'} (g_{cc'} - g_c)(\cdot)^\top,
    \quad B_2 = \tfrac{1}{N} \sum_{n, c'} p_{nc'} (g_{nc'} - g_{y_n c'})(\cdot)^\top.

The exact loss-Hessian factor of cross-entropy makes the columns of ``V`` exactly
``v_{nc'} = \sqrt{p_{nc'} / N}\, g_{nc'}`` (index ``n·C + c'``). Every ``g`` above is
then ``V a`` for a coefficient vector ``a``, each part is ``V B Bᵀ Vᵀ`` and its
nonzero spectrum is that of the small matrix ``Bᵀ (VᵀV) B`` — a contraction of the
Gram matrix with weights built from the softmax probabilities and the labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

PARTS = ("A1", "A2", "B1", "B2")


def part_coefficients(probs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Build the coefficient matrices ``B`` of each part, ``part = V B Bᵀ Vᵀ``.

    Args:
        probs: Softmax probabilities ``[N, C]``.
        labels: Labels ``[N]``.

    Returns:
        ``{"A1": [NC, C'], "A2": [NC, C'], "B1": [NC, C'(C-1)], "B2": [NC, NC]}``
        in float64, with ``C'`` the number of classes present in the batch.

    """
    probs = probs.detach().to(torch.float64)
    num_samples, num_classes = probs.shape
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
    mass = onehot.T @ probs  # P[c, c'] = sum_{n in c} p[n, c']
    present = onehot.sum(0) > 0
    root = (num_samples * probs).sqrt()  # coefficient of v_{nc'} in g_{nc'}
    # a[c, c'] as [C, C, N, C] tensor: entry (n, c') of class c's mean g_{cc'}
    eye = torch.eye(num_classes, dtype=torch.float64)
    a_pair = torch.einsum("nc,nk,kj->cknj", onehot, root, eye)
    a_pair = a_pair / mass.clamp_min(torch.finfo(torch.float64).tiny)[:, :, None, None]
    off = mass * (1 - eye)
    p_class = off.sum(1)
    a_class = torch.einsum("ck,cknj->cnj", off, a_pair) / p_class[:, None, None]
    flat = num_samples * num_classes
    pair_flat, class_flat = (
        a_pair.reshape(num_classes, num_classes, flat),
        a_class.reshape(num_classes, flat),
    )
    cols_a1 = (p_class / num_samples).sqrt()[:, None] * class_flat
    diag = torch.arange(num_classes)
    cols_a2 = (mass[diag, diag] / num_samples).sqrt()[:, None] * pair_flat[diag, diag]
    pairs = [
        (c, k)
        for c in range(num_classes)
        for k in range(num_classes)
        if c != k and present[c]
    ]
    cols_b1 = torch.stack(
        [
            (mass[c, k] / num_samples).sqrt() * (pair_flat[c, k] - class_flat[c])
            for c, k in pairs
        ]
    )
    own_mean = pair_flat[labels]  # [N, C, NC]: a_{y_n c'} for every (n, c')
    weight = (probs / num_samples).sqrt()
    cols_b2 = torch.eye(flat, dtype=torch.float64) - (
        weight[:, :, None] * own_mean
    ).reshape(flat, flat)
    return {
        "A1": cols_a1[present].T,
        "A2": cols_a2[present].T,
        "B1": cols_b1.T,
        "B2": cols_b2.T,
    }


def part_spectra(
    gram: Tensor, probs: Tensor, labels: Tensor, rtol: float = 1e-10
) -> dict[str, Tensor]:
    """Compute the nonzero eigenvalues of ``G``, of each part and of ``G`` minus it.

    Since the parts' coefficient matrices satisfy ``Σ B Bᵀ = I``, ``G − part`` is the
    sum of the other three parts, ``V L Lᵀ Vᵀ`` with ``L`` their coefficient
    matrices side by side; its nonzero spectrum is that of ``Lᵀ (VᵀV) L``.

    Args:
        gram: Gram matrix ``VᵀV`` ``[NC, NC]`` of the exact factor (index ``n·C + c``),
            preferably from a float64 pass.
        probs: Softmax probabilities ``[N, C]``.
        labels: Labels ``[N]``.
        rtol: Eigenvalues below ``rtol`` times the largest eigenvalue of ``G`` are
            dropped as round-off. Default: ``1e-10`` (a float64 Gram matrix).

    Returns:
        ``{"G": ..., "A1": ..., "A2": ..., "B1": ..., "B2": ..., "G-A1": ...,
        "G-A2": ..., "G-B1": ..., "G-B2": ...}``, float64, descending.

    """
    gram = gram.to(torch.float64)
    spectra = {"G": _descending(gram)}
    coefficients = part_coefficients(probs, labels)
    for name, coeffs in coefficients.items():
        spectra[name] = _descending(coeffs.T @ gram @ coeffs)
    for name in PARTS:
        rest = torch.cat([b for other, b in coefficients.items() if other != name], 1)
        spectra[f"G-{name}"] = _descending(rest.T @ gram @ rest)
    cutoff = rtol * spectra["G"][0]
    return {name: evals[evals > cutoff] for name, evals in spectra.items()}


def class_mean_gram(gram: Tensor, probs: Tensor, labels: Tensor) -> Tensor:
    """Gram matrix ``⟨g_c, g_c'⟩`` of Papyan's class means ``g_c`` (A1's vectors).

    Args:
        gram: Gram matrix ``VᵀV`` ``[NC, NC]`` of the exact factor.
        probs: Softmax probabilities ``[N, C]``.
        labels: Labels ``[N]``.

    Returns:
        ``[C', C']`` for the ``C'`` classes present in the batch (ascending class
        index), float64.

    """
    coeffs = part_coefficients(probs, labels)["A1"]  # √(P_c/N) a_c, present classes
    probs = probs.detach().to(torch.float64)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(torch.float64)
    mass = onehot.T @ probs
    p_class = (mass.sum(1) - mass.diagonal())[onehot.sum(0) > 0]
    unscaled = coeffs / (p_class / len(labels)).sqrt()
    return unscaled.T @ gram.to(torch.float64) @ unscaled


def _descending(matrix: Tensor) -> Tensor:
    return torch.linalg.eigvalsh((matrix + matrix.T) / 2).flip(0)


def part_gram_sum(probs: Tensor, labels: Tensor) -> Tensor:
    """Return ``Σ_parts B Bᵀ``; equals the identity when the parts sum to ``G``."""
    return sum(b @ b.T for b in part_coefficients(probs, labels).values())
