"""Per-sample first- and second-order directional derivatives and their statistics."""

from __future__ import annotations

import torch
from torch import Tensor


def directional_gammas(vt_grads: Tensor, gram_evecs: Tensor, evals: Tensor) -> Tensor:
    r"""Per-sample directional gradients ``γ_nk = e_kᵀ g_n``.

    .. math:: γ_{nk} = \tilde{e}_k^⊤ V^⊤ g_n / \sqrt{λ_k}

    Args:
        vt_grads: ``Vᵀ g_n`` stacked over samples, shape ``[M, N_g]``.
        gram_evecs: Gram eigenvectors ``[M, K]``.
        evals: Nonzero eigenvalues ``[K]``.

    Returns:
        ``γ_nk``, shape ``[N_g, K]``.
    """
    return (vt_grads.to(gram_evecs.dtype).T @ gram_evecs) / evals.sqrt()


def directional_lambdas(
    gram_evecs: Tensor, evals: Tensor, num_samples: int, batch_scale: float = 1.0
) -> Tensor:
    r"""Per-sample directional curvatures ``λ_nk = e_kᵀ G_n e_k``.

    For a factor with ``V Vᵀ = G = s · (1/N) Σ_n G_n`` (columns sample-major;
    ``s`` = ``batch_scale``, 1 when ``G`` is the mean of the ``G_n``), the Gram
    matrix gives them for free:

    .. math:: λ_{nk} = \frac{N}{s} λ_k \sum_c [\tilde{e}_k]_{nc}^2

    so that their mean over ``n`` is ``λ_k / s``.

    Args:
        gram_evecs: Gram eigenvectors ``[N·C, K]``.
        evals: Nonzero eigenvalues ``[K]``.
        num_samples: ``N``, the number of samples behind the columns.
        batch_scale: ``s``. Default ``1``.

    Returns:
        ``λ_nk``, shape ``[N, K]``.
    """
    M, K = gram_evecs.shape
    if M % num_samples != 0:
        raise ValueError(f"Gram size {M} is not a multiple of N={num_samples}.")
    per_sample = gram_evecs.reshape(num_samples, M // num_samples, K).pow(2).sum(1)
    return (num_samples / batch_scale) * evals * per_sample


def signal_to_noise(samples: Tensor) -> Tensor:
    """Signal-to-noise ratio ``mean² / variance`` over the first axis.

    The variance uses Bessel's correction (``N - 1``). A direction with zero
    variance gets ``inf``, or ``0`` if its mean is zero too (no signal).

    Args:
        samples: Per-sample values, shape ``[N, K]`` with ``N >= 2``.

    Returns:
        SNR per direction, shape ``[K]``.

    Raises:
        ValueError: With fewer than two samples (the variance is undefined).
    """
    if samples.shape[0] < 2:
        raise ValueError(
            f"The signal-to-noise ratio needs at least 2 samples, got "
            f"{samples.shape[0]}: use a larger batch (or more indices in "
            "subsampling / grad_subsampling)."
        )
    mean_sq = samples.mean(0).pow(2)
    var = samples.var(0)
    snr = mean_sq / var
    return torch.where((var == 0) & (mean_sq == 0), torch.zeros_like(snr), snr)


def gradient_overlaps(gamma_means: Tensor, grad_norm_sq: Tensor | float) -> Tensor:
    """Normalised overlap ``γ_k² / ‖g‖²`` of the gradient with each direction.

    Overlaps are additive over orthonormal directions, so their sum is at most
    one; ``1 - sum`` is the gradient's share in the flat (null) space.

    Args:
        gamma_means: Directional gradients ``γ_k = e_kᵀ g``, shape ``[K]``.
        grad_norm_sq: ``‖g‖²``.

    Returns:
        Overlaps, shape ``[K]``; zeros for a zero gradient.
    """
    overlaps = gamma_means.pow(2) / grad_norm_sq
    return overlaps if float(grad_norm_sq) > 0 else torch.zeros_like(overlaps)
