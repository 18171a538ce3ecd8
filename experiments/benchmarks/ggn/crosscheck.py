"""Cross-check of vivitlib's and vivit's outputs from the same run.

The benchmark's timing process runs both libraries on the same model and data;
their warm-up results are compared here, so that every timed row also says
whether the two libraries computed the same thing (a fast wrong answer would
otherwise look like a win). The measure is a relative difference, per
configuration:

* eigenvalues (``eigvals*``): both spectra sorted descending, restricted to the
  eigenvalues above ``RTOL · λ_max`` (vivit's criterion, also used in the
  Newton step), ``max |λ_ours − λ_theirs| / λ_max``; per block for the
  layer-wise configuration. MC runs are seeded identically before each library.
* ``eigpairs_top10``: the eigenvalue difference as above and ``1 − |cos|``
  between corresponding eigenvectors (sign-free); the larger of the two.
* ``dirderiv_top10``: the per-sample λ_nk and |γ_nk| (sign-free) of the top
  directions, matched by descending eigenvalue, ``max |a − b| / max |a|``.
* ``newton``: ``‖s_ours − s_theirs‖ / ‖s_theirs‖`` of the damped Newton step.
  The libraries keep different directions here (vivitlib: every eigenvalue
  above its round-off cut-off; the vivit runner: ``λ > 1e-4 · λ_max``), so the
  steps differ by the part ``Σ γ_k / (λ_k + δ) e_k`` of the directions in
  between: 0.15 on ``digits_mlp`` at ``N = 64``, below 1e-3 at ``N = 8`` — a
  difference of definition, not an error of either library.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from experiments.benchmarks.ggn.runners import RTOL


def _flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in tensors])


def _spectrum_error(ours: Tensor, theirs: Tensor) -> float:
    ours = ours.detach().to(torch.float64).cpu().sort(descending=True).values
    theirs = theirs.detach().to(torch.float64).cpu().sort(descending=True).values
    top = max(ours[0].item(), theirs[0].item())
    count = int(max((ours > RTOL * top).sum(), (theirs > RTOL * top).sum()))
    length = max(len(ours), len(theirs), count)
    a = torch.zeros(length, dtype=torch.float64)
    b = torch.zeros(length, dtype=torch.float64)
    a[: len(ours)], b[: len(theirs)] = ours, theirs
    return ((a[:count] - b[:count]).abs().max() / top).item()


def _descending_columns(values: Tensor, evals: Tensor) -> Tensor:
    order = evals.detach().cpu().argsort(descending=True)
    return values[..., order]


def compare(config: str, ours: Any, theirs: Any) -> float:
    """Relative difference of one configuration's outputs (see module doc).

    Args:
        config: The configuration (:data:`runners.CONFIGS`).
        ours: vivitlib's result from :func:`runners.make_runner`.
        theirs: vivit's result for the same configuration.

    Returns:
        The relative difference (0 when identical).

    Raises:
        ValueError: For a configuration without outputs to compare.

    """
    if config.startswith("eigvals"):
        return max(_spectrum_error(a, b) for a, b in zip(ours, theirs, strict=True))
    if config == "eigpairs_top10":
        (evals_a, vecs_a), (evals_b, vecs_b) = ours, theirs
        error = _spectrum_error(evals_a, evals_b)
        a = torch.stack([_flat([v[k] for v in vecs_a]) for k in range(len(evals_a))])
        b = torch.stack([_flat([v[k] for v in vecs_b]) for k in range(len(evals_b))])
        a = a[evals_a.detach().cpu().argsort(descending=True)]
        b = b[evals_b.detach().cpu().argsort(descending=True)]
        cos = (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))
        return max(error, (1 - cos).max().item())
    if config == "dirderiv_top10":
        (gam_a, lam_a), (gam_b, lam_b) = ours, theirs
        order_a, order_b = lam_a.mean(0), lam_b.mean(0)  # λ_k = mean_n λ_nk
        errors = []
        for a, b in ((lam_a, lam_b), (gam_a.abs(), gam_b.abs())):
            a = _descending_columns(a.detach().double().cpu(), order_a)
            b = _descending_columns(b.detach().double().cpu(), order_b)
            errors.append(((a - b).abs().max() / a.abs().max()).item())
        return max(errors)
    if config == "newton":
        a, b = _flat(ours), _flat(theirs)
        return ((a - b).norm() / b.norm()).item()
    raise ValueError(f"No outputs to compare for config {config!r}.")
