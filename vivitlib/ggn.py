"""``LowRankGGN``: the GGN's low-rank factor, collected in one backward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from vivitlib.accumulator import GroupAccumulator
from vivitlib.block import GGNBlock
from vivitlib.collector import BackpackCollector
from vivitlib.linalg.eigh import check_rtol, choose_eigh_dtype
from vivitlib.memory import MemoryBudget


def check_gradients_match(
    params: list[Tensor],
    before: dict[int, Tensor | None],
    grad_totals: dict[int, Tensor],
) -> None:
    """Raise if ``backward()`` put more into ``.grad`` than the loss module's term.

    All norms are computed on the device and read back at once (one host
    synchronisation per pass).

    Args:
        params: Grouped parameters after the backward pass.
        before: Their ``.grad`` before the pass by ``id`` (``None``: there was none).
        grad_totals: Summed per-sample gradients by ``id`` of the parameter.

    Raises:
        ValueError: If a difference exceeds round-off.
    """
    checked, rows = [], []
    for param in params:
        total = grad_totals.get(id(param))
        if total is None or param.grad is None:
            continue
        grad, old = param.grad.detach(), before.get(id(param))
        added = grad if old is None else grad - old
        expected = total.reshape(param.shape).to(added.dtype)
        norms = [expected.norm(), added.norm(), (added - expected).norm()]
        rows.append(torch.stack(norms).double())
        checked.append(param)
    if not checked:
        return
    device = rows[0].device
    values = torch.stack([row.to(device) for row in rows]).tolist()  # one sync
    for param, (norm_expected, norm_added, diff) in zip(checked, values):
        # ∛ε: 5e-3 in float32, 6e-6 in float64 -- far above the round-off of
        # summing per-sample gradients in another order, even where they cancel
        eps = torch.finfo(param.grad.dtype).eps ** (1 / 3)
        if diff > eps * max(norm_expected + norm_added, 1e-30):
            raise ValueError(
                f"backward() added to the .grad of a parameter of shape "
                f"{tuple(param.shape)} something other than the loss module's "
                "per-sample gradients: another term contributed (a regulariser "
                "added to the loss, or the parameter used outside the extended "
                "modules), or another forward pass ran between this loss and its "
                "backward() (BackPACK keeps only the latest forward's inputs). "
                "The curvature would not describe this loss. Call backward() on "
                "the loss module's output alone, right after its forward pass, "
                "and add regularisers in the optimiser (e.g. weight_decay=)."
            )


#: Everything a pass can deliver; ``compute=`` picks a subset.
QUANTITIES = ("eigenvalues", "eigenvectors", "directional_derivatives", "newton_step")
_NEEDS_GRADS = {"directional_derivatives", "newton_step"}
_NEEDS_FACTORS = {"eigenvectors", "newton_step"}


class LowRankGGN(BackpackCollector):
    """The GGN ``G = V Vᵀ`` per parameter group, from one backward pass.

    Inside ``with backpack(*ggn.extensions, extension_hook=ggn.hook)`` the
    backward pass computes, layer by layer, each layer's share of the Gram
    matrix ``VᵀV``, of ``Vᵀ g_n`` and of the gradient, then frees the layer's
    buffers. Afterwards ``ggn.blocks`` holds one :class:`~vivitlib.block.GGNBlock`
    per group with eigenvalues, lifted eigenvectors, per-sample directional
    derivatives and Newton steps. ``.grad`` is filled exactly as by a plain
    backward pass.

    Conventions: per-sample gradients ``g_n``, GGNs ``G_n`` and with them
    ``γ_nk = e_kᵀ g_n`` and ``λ_nk = e_kᵀ G_n e_k`` belong to the per-sample loss
    ``ℓ_n`` — what the loss with ``reduction='sum'`` gives on sample ``n`` alone
    — whatever the batch reduction. The batch loss is ``L = (1/Z) Σ_n ℓ_n``
    (``'mean'``; ``Z`` = number of counted elements, or the summed class
    weights) or ``Σ_n ℓ_n`` (``'sum'``), over the samples the loss counts
    (targets equal to ``ignore_index`` are left out everywhere). Each block's
    ``batch_scale`` (``N_counted/Z``; 1 for a plain ``'mean'``, ``N`` for
    ``'sum'``) turns means of per-sample quantities into batch quantities:
    ``evals`` are the eigenvalues of the batch GGN, ``grad`` is the batch
    gradient. With ``subsampling`` the curvature is the batch GGN estimated
    from the subset, ``batch_scale · (1/|S|) Σ_{n∈S} G_n``: for a plain
    ``'mean'`` exactly the GGN of the subset's mean loss.

    Args:
        params: Parameters (one group), or a list of ``{"params": [...]}`` dicts
            (one block each), e.g. :func:`vivitlib.layerwise_groups`.
        mc_samples: ``0`` for the exact loss-Hessian factor (``C`` columns per
            sample), ``m > 0`` for ``m`` Monte-Carlo samples (``m`` columns).
        subsampling: Indices of the samples used for curvature (default all),
            or a rule ``rule(batch_size, outputs) -> indices | None`` called
            when each pass reaches the loss, with the batch size and the
            number of model outputs per sample (e.g. ``lambda n, c: list(range(
            min(16, n)))``; one process only; such a collector keeps its own
            factor pass under :func:`vivitlib.combine`).
        grad_subsampling: Indices of the samples used for per-sample gradients
            (default all); may differ from ``subsampling``.
        compute: Subset of ``("eigenvalues", "eigenvectors",
            "directional_derivatives", "newton_step")``; default all. Eigenvalues
            alone skip per-sample gradients and free every factor at once.
        eigh_dtype: Precision of the Gram eigen-decomposition: float64
            (default), float32 (about twice as fast for large Gram matrices,
            resolves fewer directions), or ``"auto"``: float32 exactly where
            it provably meets an explicit ``rtol`` (see
            :func:`vivitlib.linalg.choose_eigh_dtype`).
        process_group: ``None`` (default) for one process; ``True`` (the default
            group) or a ``torch.distributed`` process group to describe the
            GGN of the concatenated global batch (rank order) on every rank:
            each rank exchanges its layers' factors (never the dense ``V``),
            indices in ``subsampling``/``grad_subsampling`` are global, and
            ``gammas``/``lambdas`` hold every global sample. ``.grad`` stays
            local (averaging it is DDP's job). See :mod:`vivitlib.distributed`.
        generator: Source of the Monte-Carlo draws (``mc_samples > 0``); default
            torch's global generator. With one, passes are reproducible and the
            global random state is left alone; across processes give each rank
            its own.
        rtol: Eigenvalues ``≤ rtol · λ_max`` are dropped as zero (a number in
            ``[0, 1)``). Default ``None``: the round-off cut-off of the
            precision the computation had (see
            :func:`vivitlib.linalg.eigenvalue_cutoff`).
        max_memory: Working-memory budget of the pass, trading time for memory:
            bytes as an int, or a string such as ``"512MiB"`` or ``"2GB"``.
            It bounds what the pass holds beyond a plain backward pass (model,
            activations, ``.grad``) and its results (the ``NC × NC`` Gram):
            backpropagated factors (and a convolution's unfolded input)
            larger than an eighth of it stay lazy and are formed a few
            columns, channels or samples at a time (a sixteenth of it), and
            the contraction kernels work in slices of a quarter to an eighth
            of it. Numbers are the same under
            every budget. A layer that cannot fit (one column of its factor
            is larger) runs with its smallest working set and emits a
            :class:`vivitlib.memory.MemoryBudgetWarning` naming the budget
            that would have been honoured. Default ``None``: factors above
            16 MiB stay lazy, kernels use their default chunks. See
            :mod:`vivitlib.memory`.

    Raises:
        TypeError, ValueError: On malformed groups, indices or options.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        mc_samples: int = 0,
        subsampling: Sequence[int] | Tensor | Callable | None = None,
        grad_subsampling: Sequence[int] | Tensor | None = None,
        compute: Sequence[str] = QUANTITIES,
        eigh_dtype: torch.dtype | str = torch.float64,
        rtol: float | None = None,
        process_group: Any = None,
        generator: torch.Generator | None = None,
        max_memory: int | str | None = None,
    ):
        self.compute = _check_compute(compute)
        choose_eigh_dtype(eigh_dtype, 1, None)  # validates
        self.eigh_dtype = eigh_dtype
        self.rtol = check_rtol(rtol)
        self._blocks: list[GGNBlock] | None = None
        super().__init__(
            params,
            mc_samples=mc_samples,
            subsampling=subsampling,
            grad_subsampling=grad_subsampling,
            needs_grads=bool(_NEEDS_GRADS & set(self.compute)),
            process_group=process_group,
            generator=generator,
            max_memory=max_memory,
        )
        if "eigenvectors" not in self.compute:
            # a hint for speed only (the numbers never depend on it): kept
            # factors usually lift one vector per step (the Newton step), so
            # the cost model weighs forming a dense V against one application
            self._budget = MemoryBudget.split(self.max_memory, lifted_vectors=1)

    @property
    def blocks(self) -> list[GGNBlock]:
        """One result block per parameter group, from the latest backward pass.

        Raises:
            RuntimeError: If no complete pass has been collected.
        """
        if self._blocks is None:
            scaling = self._finish_pass()
            self._blocks = [
                GGNBlock(
                    acc,
                    scaling,
                    rtol=self.rtol,
                    eigh_dtype=self.eigh_dtype,
                    has_grads=self._needs_grads,
                    eigenvectors=self.compute != ("eigenvalues",),
                    column_basis=self._pass.column_basis,
                )
                for acc in self._pass.accumulators
            ]
        return self._blocks

    def _on_reset(self) -> None:
        self._blocks = None

    def _check_backward(self, pass_) -> None:
        """``.grad`` must be what the loss module's per-sample gradients sum to."""
        if not self._needs_grads or self.grad_subsampling is not None:
            return
        if self.process_group is not None:
            return  # the gathered gradients are the global batch's, .grad is local
        before = {key: grad for key, (_, grad) in pass_.grad_backup.items()}
        totals = {
            k: v for acc in pass_.accumulators for k, v in acc.grad_totals.items()
        }
        check_gradients_match(pass_.params, before, totals)

    def _new_accumulators(self) -> list[GroupAccumulator]:
        keep = bool(_NEEDS_FACTORS & set(self.compute))
        return [GroupAccumulator(g["params"], keep) for g in self.param_groups]


def _check_compute(compute: Sequence[str]) -> tuple[str, ...]:
    if isinstance(compute, str):
        compute = (compute,)
    unknown = set(compute) - set(QUANTITIES)
    if unknown or not compute:
        raise ValueError(
            f"compute must be a non-empty subset of {QUANTITIES}, got {tuple(compute)}."
        )
    return tuple(compute)
