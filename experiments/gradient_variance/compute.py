"""Gradient and curvature variance, and Hessian norms, on batches of training data.

For each batch of ``N`` training samples (pass in float64):

* from BackPACK's ``BatchGrad``: ``grad_norm_sq`` = ``‖ḡ‖²`` of the mini-batch
  gradient and ``grad_var_trace`` = ``tr Σ = mean_n ‖g_n − ḡ‖²``;
* from vivitlib's Gram matrix: ``ggn_frobenius`` = ``‖G‖_F`` and
  ``ggn_sample_var`` = ``mean_n ‖G_n − G‖_F²``, the variance of the per-sample GGNs
  ``G_n`` about their mean ``G`` (exact: ``‖G_n‖_F`` is the norm of sample ``n``'s
  diagonal Gram block);
* matrix-free (:mod:`vivitlib.hessianfree`, float64) on the batch Hessian ``H``:
  ``hessian_lambda_max`` (Lanczos), ``hessian_trace`` and ``hessian_frobenius``
  (Hutchinson, ``E[vᵀHv]`` and ``E‖Hv‖²`` over Rademacher ``v``, ``--probes``
  probes) — the Deep Curvature suite's norms along training; their spread over the
  batches is the batch-to-batch variance of the Hessian (for the trace and the
  Frobenius norm it includes the Hutchinson estimate's own noise, relative standard
  deviation about ``√(2/probes) · ‖H‖_F / |tr H|`` for the trace);
* per-sample Hessians (``torch.func``, float64): ``hessian_sample_var`` =
  ``mean_n ‖H_n − H‖_F²``, the variance of the per-sample Hessians about the batch
  Hessian (the Deep Curvature suite's Hessian variance, Wu et al. 2018), estimated
  as ``mean_n ‖(H_n − H) v‖²`` over the same Rademacher probes (unbiased);
* along the GGN's top directions (one row each, ``k < top_k``): the columns of
  :func:`experiments.common.curvature.direction_table` (``eigenvalue`` λ_k,
  ``lambda_var`` the variance of the per-sample curvatures λ_nk, ...);
* the cut-off-independent summary of the batch's whole GGN spectrum,
  :func:`experiments.common.spectrum.spectrum_summary` (e.g.
  ``lambda_snr_gt1_share_1e-04``: share of the directions with ``λ > 1e-4·λ_max``
  whose curvature SNR exceeds one), repeated on each row of the batch.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor, nn

from experiments.common.curvature import direction_table, in_precision, low_rank_ggn
from experiments.common.spectrum import spectrum_summary


def gradient_variance(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, labels: Tensor
) -> dict[str, float]:
    """Return ``‖ḡ‖²`` and ``tr Σ`` of the per-sample gradients of one batch."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model.zero_grad()
    with backpack(BatchGrad()):
        loss_fn(model(inputs), labels).backward()
    scale = len(labels) if loss_fn.reduction == "mean" else 1
    per_sample = torch.cat(
        [p.grad_batch.flatten(1) * scale for p in model.parameters()], dim=1
    ).to(torch.float64)
    mean = per_sample.mean(0)
    return {
        "grad_norm_sq": mean.square().sum().item(),
        "grad_var_trace": (per_sample - mean).square().sum(1).mean().item(),
    }


def ggn_sample_variance(gram: Tensor, num_samples: int) -> dict[str, float]:
    """Return ``‖G‖_F`` and ``mean_n ‖G_n − G‖_F²`` from the Gram matrix.

    Args:
        gram: Gram matrix ``VᵀV`` ``[N·C, N·C]`` of a mean-reduced loss,
            sample-major (column ``n·C + c``), ``V = N^{-1/2} [v_nc]``.
        num_samples: ``N``.

    Returns:
        ``{"ggn_frobenius": ..., "ggn_sample_var": ...}``.

    """
    gram = gram.to(torch.float64)
    size = gram.shape[0] // num_samples
    blocks = gram.reshape(num_samples, size, num_samples, size)
    own = torch.diagonal(blocks, dim1=0, dim2=2).permute(2, 0, 1)  # [N, C, C]
    per_sample = (num_samples * own).square().sum((1, 2))  # ‖G_n‖_F²
    total = gram.square().sum()  # ‖G‖_F²
    return {
        "ggn_frobenius": total.sqrt().item(),
        "ggn_sample_var": (per_sample.mean() - total).item(),
    }


def hessian_norms(
    plain: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    num_probes: int,
    seed: int,
) -> dict[str, float]:
    """Largest eigenvalue, trace and Frobenius norm of the batch Hessian.

    Args:
        plain: Model without BackPACK hooks, in the evaluation precision.
        loss_fn: Loss.
        inputs: Batch inputs.
        labels: Batch labels.
        num_probes: Rademacher probes of the trace and Frobenius estimates.
        seed: Seed of the probes and the Lanczos start.

    Returns:
        ``hessian_lambda_max``, ``hessian_trace``, ``hessian_frobenius``,
        ``hessian_sample_var`` (:func:`hessian_sample_variance`, same probes).

    """
    from vivitlib import hessianfree as hf

    op = hf.HessianOperator(plain, loss_fn, [(inputs, labels)])
    generator = torch.Generator().manual_seed(seed)
    top = hf.topk_eigh(op, 1, tol=1e-6, generator=generator).evals
    probes = torch.randint(
        0, 2, (op.shape[0], num_probes), generator=generator, dtype=torch.float64
    )
    probes = 2 * probes - 1
    products = op.matmat(probes).to(torch.float64)
    return {
        "hessian_lambda_max": float(top[0]),
        "hessian_trace": (probes * products).sum(0).mean().item(),
        "hessian_frobenius": products.square().sum(0).mean().sqrt().item(),
        "hessian_sample_var": hessian_sample_variance(
            plain, loss_fn, inputs, labels, probes
        ),
    }


def hessian_sample_variance(
    plain: nn.Module, loss_fn: nn.Module, inputs: Tensor, labels: Tensor, probes: Tensor
) -> float:
    """Estimate ``mean_n ‖H_n − H‖_F²`` of the per-sample Hessians ``H_n``.

    Args:
        plain: Model without BackPACK hooks.
        loss_fn: Loss; applied to one sample at a time (``H_n`` is the Hessian of
            the per-sample loss, ``H`` their mean).
        inputs: Batch inputs ``[N, ...]``.
        labels: Batch labels ``[N]``.
        probes: ``[D, P]`` probe vectors; Rademacher probes give an unbiased
            estimate, the identity the exact value.

    Returns:
        ``mean_n mean_p ‖(H_n − H) v_p‖² · D / mean_p ‖v_p‖²``.

    """
    from torch.func import functional_call, grad, jvp, vmap

    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(p, x, y):
        return loss_fn(functional_call(plain, p, (x[None],)), y[None])

    def hvp(x, y, v):
        tangent = dict(zip(names, (t.reshape(s) for t, s in
                                   zip(v.split(sizes), shapes, strict=True)),
                           strict=True))  # fmt: skip
        out = jvp(lambda p: grad(loss)(p, x, y), (params,), (tangent,))[1]
        return torch.cat([out[n].reshape(-1) for n in names])

    per_sample = vmap(vmap(hvp, in_dims=(None, None, 0)), in_dims=(0, 0, None))
    products = per_sample(inputs, labels, probes.T.to(inputs.dtype))  # [N, P, D]
    centred = products - products.mean(0, keepdim=True)
    scale = probes.shape[0] / probes.square().sum(0).mean()
    return (centred.square().sum(2).mean() * scale).item()


def variance_table(
    model: nn.Module,
    loss_fn: nn.Module,
    batches: list,
    top_k: int = 20,
    *,
    plain: nn.Module | None = None,
    plain_loss: nn.Module | None = None,
    num_probes: int = 20,
    precision: str = "float64",
    seed: int = 0,
) -> pd.DataFrame:
    """Compute gradient and curvature variance, and Hessian norms, on each batch.

    Args:
        model: BackPACK-extended model (batch norm in eval mode); cast in place.
        loss_fn: BackPACK-extended loss.
        batches: ``(inputs, labels)`` batches of training data.
        top_k: Number of top GGN directions reported per batch. Default: ``20``.
        plain: The same model without BackPACK hooks for the Hessian norms;
            ``None`` skips them.
        plain_loss: The loss without BackPACK hooks (``torch.func`` cannot pass
            through them); default a fresh ``type(loss_fn)()``.
        num_probes: Hutchinson probes. Default: ``20``.
        precision: Evaluation precision. Default: ``'float64'``.
        seed: Seed of the Hessian estimates. Default: ``0``.

    Returns:
        One row per (batch, direction ``k < top_k``) with the columns listed in the
        module docstring and ``batch``.

    """
    frames = []
    for index, (inputs, labels) in enumerate(batches):
        model, inputs = in_precision(model, inputs, precision)
        grads = gradient_variance(model, loss_fn, inputs, labels)
        ggn = low_rank_ggn(model, loss_fn, inputs, labels)
        block = ggn.blocks[0]
        table = direction_table(block)
        stats = {
            **grads,
            **ggn_sample_variance(block.gram, len(labels)),
            **spectrum_summary(table),
        }
        if plain is not None:
            plain, _ = in_precision(plain, inputs, precision)
            criterion = type(loss_fn)() if plain_loss is None else plain_loss
            stats.update(
                hessian_norms(
                    plain, criterion, inputs, labels, num_probes, seed + index
                )
            )
        frames.append(table.head(top_k).assign(batch=index, **stats))
    return pd.concat(frames, ignore_index=True)
