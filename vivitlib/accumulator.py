"""Running sums of a parameter group's contractions while BackPACK walks the net.

:class:`GroupAccumulator` adds each parameter's share of the Gram matrix,
``Ṽᵀ g_n`` and the gradient as its factor arrives (class-major columns,
BackPACK's order); :class:`Scaling` turns BackPACK's factor and gradients
into the library's conventions. :class:`~vivitlib.block.GGNBlock` reads both
once the pass is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vivitlib.factors import Factor, Grads, KroneckerFactor, as_factor, as_grads
from vivitlib.linalg.gram import add_kronecker_gram_upper, mirror_upper_


@dataclass
class Scaling:
    """Turns BackPACK's factor and gradients into the library's conventions.

    The loss is ``L = (1/Z) Σ_n ℓ_n`` (``Z = 1`` for ``'sum'``) over the
    ``N_counted`` samples it counts (see
    :class:`~vivitlib.extensions.losses.LossWeighting`). BackPACK's factor
    ``V`` satisfies ``V Vᵀ = ∇²L`` (GGN) and its per-sample gradients are the
    rows of ``∇L``, so the per-sample loss's gradient is ``g_n = Z · row_n`` and
    its GGN ``G_n = Z · V_n V_nᵀ``. With ``S`` counted curvature samples,
    ``Ṽ = sqrt(N_counted/|S|) V_S`` makes ``Ṽ Ṽᵀ = batch_scale · mean_{n∈S} G_n``,
    i.e. the batch GGN estimated from the subset (exactly the GGN of the
    subset's loss for ``'mean'`` without weights).

    Attributes:
        batch_size: ``N``, samples in the mini-batch.
        normaliser: ``Z``.
        num_counted: ``N_counted``.
        curv_keep: Positions, among the curvature samples, of those the loss
            counts (``None``: all).
        grad_keep: Same for the gradient samples.
        num_curv: ``|S|``, counted curvature samples.
        num_grad: Counted gradient samples.
    """

    batch_size: int
    normaliser: float
    num_counted: int
    curv_keep: list[int] | None
    grad_keep: list[int] | None
    num_curv: int
    num_grad: int

    @classmethod
    def from_weighting(
        cls,
        weighting,
        subsampling: list[int] | None,
        grad_subsampling: list[int] | None,
    ) -> Scaling:
        """Scaling of a pass whose loss has ``weighting``.

        Raises:
            ValueError: If no curvature (or gradient) sample is counted by the
                loss (e.g. every target equals ``ignore_index``).
        """
        counted = weighting.counted.tolist()
        curv_keep, num_curv = _counted_positions(counted, subsampling, "curvature")
        grad_keep, num_grad = _counted_positions(counted, grad_subsampling, "gradient")
        return cls(
            batch_size=len(counted),
            normaliser=weighting.normaliser,
            num_counted=sum(counted),
            curv_keep=curv_keep,
            grad_keep=grad_keep,
            num_curv=num_curv,
            num_grad=num_grad,
        )

    @property
    def factor(self) -> float:
        """Multiplier of BackPACK's factor ``V``."""
        return (self.num_counted / self.num_curv) ** 0.5

    @property
    def grads(self) -> float:
        """Multiplier of BackPACK's per-sample gradients (``Z``)."""
        return float(self.normaliser)

    @property
    def batch_scale(self) -> float:
        """``N_counted / Z``: batch quantity = ``batch_scale`` × mean per-sample one."""
        return self.num_counted / self.normaliser


def _counted_positions(
    counted: list[bool], samples: list[int] | None, what: str
) -> tuple[list[int] | None, int]:
    """Positions (within ``samples``) of counted samples, and how many there are."""
    chosen = range(len(counted)) if samples is None else samples
    keep = [i for i, n in enumerate(chosen) if counted[n]]
    if not keep:
        raise ValueError(
            f"The loss counts none of the {what} samples (every target is "
            "ignore_index or has zero weight); choose other samples or targets."
        )
    return (None if len(keep) == len(chosen) else keep), len(keep)


@dataclass
class GroupAccumulator:
    """Running sums of one group's contractions while BackPACK walks the net."""

    params: list[Tensor]
    keep_factors: bool
    # BackPACK's class-major order while accumulating (contiguous adds); the
    # block permutes once to the public sample-major order
    gram: Tensor | None = None  # [C, N, C, N], float64
    vt_grads: Tensor | None = None  # [C, N, N'], float64
    grad_totals: dict[int, Tensor] = field(default_factory=dict)
    factors: dict[int, Factor] = field(default_factory=dict)
    visited: set[int] = field(default_factory=set)
    factor_dtype: torch.dtype | None = None
    # the latest linear weight (factor, ⟨a_n, a_m⟩ in float64, version of s),
    # its Gram block not yet added: added when the next parameter arrives,
    # together with the same layer's bias (factor s itself) if that is it
    _pending: tuple[KroneckerFactor, Tensor, int] | None = None
    # whether linear weights' blocks went into the upper triangle only
    _upper_only: bool = False

    def add(self, param: Tensor, factor: Factor | Tensor, grads: Grads | Tensor | None):
        """Add one parameter's share of every contraction."""
        factor, grads = as_factor(factor), as_grads(grads)
        self.factor_dtype = factor.dtype
        gram, vtg, kept = self._contract(factor, grads)
        if gram is not None:
            self.gram = _accumulate(self.gram, gram)
        if grads is not None:
            self.vt_grads = _accumulate(self.vt_grads, vtg)
            self.grad_totals[id(param)] = grads.total()
        if self.keep_factors:
            self.factors[id(param)] = kept
        self.visited.add(id(param))
        if len(self.visited) == len(self.params):  # the group is complete:
            self._add_pending()  # free a waiting linear weight's s and a now

    def _contract(
        self, factor: Factor, grads: Grads | None
    ) -> tuple[Tensor | None, Tensor | None, Factor | None]:
        """``factor.contract``, sharing a linear layer's ``S Sᵀ`` with its bias.

        A linear weight's Gram block ``⟨s_cn, s_dm⟩ ⟨a_n, a_m⟩`` waits until
        the next parameter (returned Gram ``None``): if that is the same
        layer's bias (its factor is ``s``, same memory), both blocks are added
        as ``⟨s_cn, s_dm⟩ (⟨a_n, a_m⟩ + 1)`` in one pass over ``S Sᵀ``.
        """
        pending, keep = self._pending, self.keep_factors
        bias = pending is not None and pending[0].is_bias_factor(factor, pending[2])
        self._add_pending(bias=bias)
        if not bias and not isinstance(factor, KroneckerFactor):
            return factor.contract(grads, keep=keep)
        if not bias:
            a = factor.a[:, 0].to(torch.float64)
            self._pending = (factor, a @ a.T, factor.version)
        vtg = None if grads is None else factor.times_grads(grads)
        return None, vtg, factor if keep else None

    def _add_pending(self, bias: bool = False) -> None:
        """Add the waiting linear weight's Gram block (with its bias's, if ``bias``).

        Row by row into the upper triangle of the float64 sum: no ``[C·N,
        C·N]`` temporary (see :func:`~vivitlib.linalg.gram.add_kronecker_gram_upper`).
        """
        if self._pending is None:
            return
        factor, aa, version = self._pending
        self._pending = None
        if factor.version != version:
            raise RuntimeError(
                "The GGN factor of a linear layer was changed in place before its "
                "Gram block was added; this is a bug in vivitlib's extensions, "
                "please report it."
            )
        s = factor.s[:, :, 0]
        if self.gram is None:
            C, N = s.shape[:2]
            self.gram = s.new_zeros(C, N, C, N, dtype=torch.float64)
        add_kronecker_gram_upper(self.gram, s, aa + 1 if bias else aa)
        self._upper_only = True

    def total_gram(self) -> Tensor:
        """The group's Gram matrix ``[C, N, C, N]`` (float64), every part added."""
        self._add_pending()
        if self._upper_only:
            size = self.gram.shape[0] * self.gram.shape[1]
            mirror_upper_(self.gram.view(size, size))
            self._upper_only = False
        return self.gram

    def missing(self) -> list[Tensor]:
        """Parameters of the group that received no factor in this pass."""
        return [p for p in self.params if id(p) not in self.visited]


#: Entries of ``part`` converted at a time when adding a float32 block into the
#: float64 sum (a mixed-dtype ``add_`` would convert all of it at once).
_ADD_CHUNK_ELEMENTS = 2**20


def _accumulate(total: Tensor | None, part: Tensor) -> Tensor:
    """``total + part`` in float64 (a contiguous copy on first use).

    Adding a lower-precision ``part`` goes slice by slice along the first two
    axes, so the float64 temporary stays small instead of the size of the
    ``[C, N, C, N]`` sum. ``part`` is left unchanged.
    """
    if total is None:
        return part.to(torch.float64).contiguous()
    if part.dtype == total.dtype:
        return total.add_(part)
    per_sample = part[0, 0].numel()
    step = max(1, min(part.shape[1], _ADD_CHUNK_ELEMENTS // max(per_sample, 1)))
    for c in range(part.shape[0]):
        for n0 in range(0, part.shape[1], step):
            total[c, n0 : n0 + step].add_(part[c, n0 : n0 + step])
    return total
