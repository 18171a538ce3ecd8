"""The results users read for one parameter group (:class:`GGNBlock`).

Column order: inside the library (factors, kernels, accumulators) every
Gram-space quantity is class-major ``(c, n)``, BackPACK's order. What users
read is sample-major: column ``n·C + c`` belongs to curvature sample ``n`` and
factor column ``c`` (output dimension for the exact factor, MC sample for
``mc_samples > 0``). The two meet only in :func:`to_public_columns` and
:func:`to_internal_columns`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor

from vivitlib import linalg
from vivitlib._checks import check_int_at_least
from vivitlib.accumulator import GroupAccumulator, Scaling
from vivitlib.linalg.gram import CHUNK_ELEMENTS, mirror_upper_


def _check_vectors(
    params: list[Tensor], vectors: Sequence[Tensor]
) -> tuple[list[Tensor], bool]:
    """``vectors`` as ``[k, *shape]`` per parameter, and whether ``k`` was absent."""
    if isinstance(vectors, Tensor):
        raise TypeError(
            "vectors must be a sequence with one tensor per parameter, got a "
            "single tensor; wrap it in a list."
        )
    vectors = list(vectors)
    if len(vectors) != len(params):
        raise ValueError(
            f"Got {len(vectors)} tensors for {len(params)} parameters; pass one "
            "per parameter of the group."
        )
    single = all(tuple(v.shape) == tuple(p.shape) for p, v in zip(params, vectors))
    stacked = [v.unsqueeze(0) if single else v for v in vectors]
    for p, v in zip(params, stacked):
        if tuple(v.shape[1:]) != tuple(p.shape) or v.shape[0] != stacked[0].shape[0]:
            raise ValueError(
                f"A vector of shape {tuple(v.shape)} does not fit a parameter of "
                f"shape {tuple(p.shape)}; pass tensors shaped like the parameters "
                "(or [k, *param.shape] with the same k for all)."
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError("The vectors contain NaN or Inf; pass finite vectors.")
    return [v.detach() for v in stacked], single


def to_public_columns(x: Tensor) -> Tensor:
    """Class-major ``[C, N, ...]`` → sample-major ``[N, C, ...]`` (a view)."""
    return x.transpose(0, 1)


def to_internal_columns(x: Tensor) -> Tensor:
    """Sample-major ``[N, C, ...]`` → class-major ``[C, N, ...]`` (a view)."""
    return x.transpose(0, 1)


def _index(positions: list[int] | None, device: torch.device) -> Tensor | None:
    return None if positions is None else torch.tensor(positions, device=device)


def _gram_of_counted(gram: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    """``[C, N, C, N]`` accumulator → scaled ``[C, N', C, N']`` of counted samples.

    Scaled in place; a copy only when samples are dropped.
    """
    if keep is not None:
        gram = gram.index_select(1, keep).index_select(3, keep)
    return gram if scale == 1 else gram.mul_(scale)


def _rows_to_public_(rows: Tensor, num_columns: int) -> Tensor:
    """Class-major rows ``[C·N, K]`` → sample-major ``[N·C, K]``, in place.

    A few columns at a time (no ``[C·N, K]`` temporary).
    """
    M = rows.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(M, 1))
    for k0 in range(0, rows.shape[1], step):
        part = rows[:, k0 : k0 + step]
        shaped = part.reshape(num_columns, M // num_columns, -1)
        part.copy_(to_public_columns(shaped).reshape(part.shape))
    return rows


#: Rows per strip when the Gram's lower triangle is saved.
_STRIP_ROWS = 128


def _lower_strips(matrix: Tensor) -> list[Tensor]:
    """Copies of ``matrix[i0:i1, :i1]``, strips of rows: its lower triangle."""
    M = matrix.shape[0]
    return [
        matrix[i0 : i0 + _STRIP_ROWS, : i0 + _STRIP_ROWS].clone()
        for i0 in range(0, M, _STRIP_ROWS)
    ]


def _from_lower_strips(strips: list[Tensor]) -> Tensor:
    """``[M, M]`` whose lower triangle is the saved one (upper left empty)."""
    M = sum(strip.shape[0] for strip in strips)
    out = strips[0].new_empty(M, M)
    i0 = 0
    for strip in strips:
        i1 = i0 + strip.shape[0]
        out[i0:i1, :i1] = strip
        i0 = i1
    return out


class GGNBlock:
    """Curvature of one parameter group from one backward pass.

    Attributes:
        params: The group's parameters.
        evals: Nontrivial GGN eigenvalues, descending, ``[K]``.
        gram_evecs: Matching Gram eigenvectors ``ẽ_k``, ``[N_c·C, K]`` (``None``
            when only eigenvalues were asked for: then ``eigvalsh`` suffices).
        num_curv_samples: ``N_c``, samples behind the curvature.
        num_grad_samples: ``N_g``, samples behind the per-sample gradients.

    A cross-entropy factor may reach the block deflated, ``C - 1`` columns per
    sample (:func:`~vivitlib.extensions.losses.cross_entropy_column_basis`); then
    ``column_basis`` ``[n, C, C - 1]`` (one row per curvature sample of the
    factor) maps its columns back, and :attr:`gram` and :attr:`gram_evecs`
    are those of BackPACK's ``C`` columns. Everything else is unchanged by a
    per-sample orthogonal change of columns.
    """

    def __init__(
        self,
        acc: GroupAccumulator,
        scaling: Scaling,
        *,
        rtol: float | None,
        eigh_dtype: torch.dtype,
        has_grads: bool,
        eigenvectors: bool = True,
        column_basis: Tensor | None = None,
    ):
        self.params = acc.params
        self.num_curv_samples = scaling.num_curv
        self.num_grad_samples = scaling.num_grad
        self.batch_scale = scaling.batch_scale
        # the accumulator itself, class-major: its eigenvalues are the Gram's
        # (a permutation of rows and columns); the eigenvectors' rows are
        # reordered once, the public sample-major Gram made only if read
        gram = acc.total_gram()
        self._num_columns, self._num_factor_samples = gram.shape[:2]
        self._curv_keep = _index(scaling.curv_keep, gram.device)
        gram = _gram_of_counted(gram, self._curv_keep, scaling.factor**2)
        acc.gram = None
        size = gram.shape[0] * gram.shape[1]
        matrix = gram.view(size, size)
        # decomposed in place (no second [M, M] buffer). Eigenvalues alone
        # overwrite the upper triangle and the diagonal: rebuilt from the
        # strict lower triangle and this copy of the diagonal if read.
        # Eigenvectors overwrite all of it: the lower triangle is saved first
        # (half a matrix, in strips)
        self._gram_diagonal = matrix.diagonal().clone()
        self._gram_strips = _lower_strips(matrix) if eigenvectors else None
        self._class_major_gram = None if eigenvectors else matrix
        self.evals, gram_evecs = linalg.gram_eigh(
            matrix,
            rtol=rtol,
            dtype=eigh_dtype,
            factor_dtype=acc.factor_dtype,
            eigenvectors=eigenvectors,
            overwrite=True,
        )
        del matrix, gram
        # sample-major rows of the factor's columns (C - 1 per sample for a
        # deflated cross-entropy factor; see ``column_basis``)
        self._gram_evecs = (
            None
            if gram_evecs is None
            else _rows_to_public_(gram_evecs, self._num_columns)
        )
        if column_basis is not None and self._curv_keep is not None:
            column_basis = column_basis.index_select(0, self._curv_keep)
        self._column_basis = column_basis
        self._factors = acc.factors
        self._factor_scale = scaling.factor
        self._has_grads = has_grads
        if has_grads:
            vtg = acc.vt_grads  # [C, N, N']
            if self._curv_keep is not None:
                vtg = vtg.index_select(1, self._curv_keep)
            if scaling.grad_keep is not None:
                vtg = vtg.index_select(2, _index(scaling.grad_keep, vtg.device))
            vtg = to_public_columns(vtg).reshape(-1, vtg.shape[2])
            self._vt_grads = vtg.mul_(scaling.factor * scaling.grads)
            acc.vt_grads = None
            self._grad_mean = [
                acc.grad_totals[id(p)].reshape(p.shape)
                * (scaling.num_counted / scaling.num_grad)
                for p in self.params
            ]

    @cached_property
    def gram(self) -> Tensor:
        """Gram matrix ``ṼᵀṼ`` (float64), ``[N_c·C, N_c·C]``, sample-major.

        Made on first access from what the in-place decomposition kept: the
        strict lower triangle (or its saved strips) and the diagonal.
        """
        gram = self._class_major_gram
        if gram is None:
            gram = _from_lower_strips(self._gram_strips)
        mirror_upper_(gram.T)  # strict lower → upper
        gram.diagonal().copy_(self._gram_diagonal)
        self._class_major_gram = self._gram_strips = None
        C = self._num_columns
        shaped = gram.view(C, -1, C, gram.shape[0] // C)
        public = to_public_columns(shaped).transpose(2, 3)  # [N, C, N, C]
        if self._column_basis is not None:
            basis = self._column_basis.to(public.dtype)  # [N, C_pub, C]
            public = torch.einsum("naj,njmk->namk", basis, public)
            public = torch.einsum("namk,mbk->namb", public, basis)
        n = public.shape[0]
        return public.reshape(n * public.shape[1], n * public.shape[3])

    @cached_property
    def gram_evecs(self) -> Tensor | None:
        """Gram eigenvectors ``ẽ_k`` of :attr:`gram`, ``[N_c·C, K]``.

        ``None`` when only eigenvalues were asked for.
        """
        evecs = self._gram_evecs
        if evecs is None or self._column_basis is None:
            return evecs
        basis = self._column_basis.to(evecs.dtype)  # [N, C_pub, C]
        n, public, K = basis.shape[0], basis.shape[1], evecs.shape[1]
        shaped = evecs.reshape(n, basis.shape[2], K)
        return torch.einsum("naj,njk->nak", basis, shaped).reshape(n * public, K)

    @property
    def num_directions(self) -> int:
        """``K``, the number of nontrivial eigen-directions."""
        return self.evals.numel()

    def evecs(self, k: int | None = None) -> list[Tensor]:
        """Top-``k`` GGN eigenvectors ``e_k = Ṽ ẽ_k / √λ_k``, lifted on demand.

        Args:
            k: How many (default: all ``K``).

        Returns:
            One tensor per parameter, ``[k, *param.shape]``; together they are
            orthonormal across the group.
        """
        self._require_factors()
        if k is not None:
            check_int_at_least(k, "k", 0)
        k = self.num_directions if k is None else min(k, self.num_directions)
        coeffs = self._gram_evecs[:, :k] / self.evals[:k].sqrt()
        return self._apply(coeffs * self._factor_scale)

    def _apply(self, coeffs: Tensor) -> list[Tensor]:
        """``Σ_{n,c} coeffs[(n,c), k] v_nc`` per parameter, ``[k, *shape]``."""
        self._require_factors()
        n = coeffs.shape[0] // self._num_columns
        nck = coeffs.reshape(n, self._num_columns, -1)
        if self._curv_keep is not None:  # columns of uncounted samples get 0
            full = self._num_factor_samples
            nck = nck.new_zeros(full, *nck.shape[1:]).index_copy_(
                0, self._curv_keep, nck
            )
        cnk = to_internal_columns(nck)
        return [
            self._factors[id(p)].apply(cnk).reshape(-1, *p.shape) for p in self.params
        ]

    @cached_property
    def gammas(self) -> Tensor:
        """Per-sample directional gradients ``γ_nk = e_kᵀ g_n``, ``[N_g, K]``."""
        self._require_grads()
        return linalg.directional_gammas(self._vt_grads, self._gram_evecs, self.evals)

    @cached_property
    def lambdas(self) -> Tensor:
        """Per-sample directional curvatures ``λ_nk = e_kᵀ G_n e_k``, ``[N_c, K]``."""
        if self._gram_evecs is None:
            raise RuntimeError(
                "Per-sample curvatures need the Gram eigenvectors: add "
                "'directional_derivatives' to LowRankGGN(compute=...)."
            )
        return linalg.directional_lambdas(
            self._gram_evecs, self.evals, self.num_curv_samples, self.batch_scale
        )

    @property
    def gamma_means(self) -> Tensor:
        """Mean of ``γ_nk`` over the gradient samples, ``[K]``.

        ``batch_scale · gamma_means = e_kᵀ g`` with ``g`` the batch gradient
        (:attr:`grad`).
        """
        return self.gammas.mean(0)

    @property
    def lambda_means(self) -> Tensor:
        """Mean of ``λ_nk`` over the curvature samples, ``[K]``.

        ``batch_scale · lambda_means = evals`` (the batch GGN's eigenvalues).
        """
        return self.lambdas.mean(0)

    @property
    def batch_gammas(self) -> Tensor:
        """``e_kᵀ g`` for the batch gradient ``g`` of the loss as reduced, ``[K]``."""
        return self.gamma_means * self.batch_scale

    @property
    def gamma_snr(self) -> Tensor:
        """``SNR(γ_k) = γ_k² / Var_n(γ_nk)``, ``[K]``."""
        return linalg.signal_to_noise(self.gammas)

    @property
    def lambda_snr(self) -> Tensor:
        """``SNR(λ_k) = λ_k² / Var_n(λ_nk)``, ``[K]``."""
        return linalg.signal_to_noise(self.lambdas)

    @property
    def grad(self) -> list[Tensor]:
        """Mean gradient over the gradient samples, one tensor per parameter."""
        self._require_grads()
        return self._grad_mean

    @property
    def grad_norm_sq(self) -> Tensor:
        """``‖g‖²`` of the group's mean gradient (float64 scalar)."""
        return sum(g.double().pow(2).sum() for g in self.grad)

    @property
    def gradient_overlaps(self) -> Tensor:
        """``(e_kᵀ g)² / ‖g‖²``, the gradient's share along each direction, ``[K]``.

        Zero for a zero gradient.
        """
        return linalg.gradient_overlaps(self.batch_gammas, self.grad_norm_sq)

    def newton_step(self, damping: float | Tensor) -> list[Tensor]:
        """Damped Newton step ``-Σ_k γ_k / (λ_k + δ_k) e_k``, lifted once.

        Args:
            damping: ``δ >= 0`` for all directions, or ``[K]`` per direction;
                ``inf`` leaves a direction out.

        Returns:
            One tensor per parameter, shaped like it.
        """
        self._require_grads()
        coeffs = linalg.newton_coefficients(
            self._gram_evecs, self.evals, self.batch_gammas, damping
        )
        step = self._apply(coeffs[:, None] * self._factor_scale)
        return [s[0] for s in step]

    def inverse_ggn_product(
        self, vectors: Sequence[Tensor], damping: float
    ) -> list[Tensor]:
        r"""``(G + δI)⁻¹ v`` for any ``v``, exact, from the Gram matrix.

        .. math::
            (G + δI)^{-1} v = \frac{v}{δ}
                + \sum_k \Bigl(\frac{1}{λ_k + δ} - \frac{1}{δ}\Bigr) e_k e_k^⊤ v

        ``G`` is the group's (batch) GGN. ``δ = 0`` gives the pseudo-inverse
        ``G⁺ v`` (the part of ``v`` in the flat space is dropped). Costs one
        application of ``Vᵀ`` and one of ``V``.

        Args:
            vectors: One tensor per parameter, shaped like it, or
                ``[k, *param.shape]`` for ``k`` vectors at once.
            damping: ``δ >= 0``, finite.

        Returns:
            One tensor per parameter, shaped like ``vectors``.

        Raises:
            ValueError: On vectors that do not fit the parameters or are not
                finite, or a bad damping.
        """
        self._require_factors()
        stacked, single = _check_vectors(self.params, vectors)
        weights = linalg.inverse_weights(self.evals, damping)
        proj = sum(
            self._factors[id(p)].project(v).to(torch.float64)
            for p, v in zip(self.params, stacked)
        )  # [C, N, k]
        proj = to_public_columns(proj)
        if self._curv_keep is not None:
            proj = proj.index_select(0, self._curv_keep)
        vt_v = proj.reshape(-1, proj.shape[-1]) * self._factor_scale  # Ṽᵀ v
        coords = self._gram_evecs.T @ vt_v.to(self._gram_evecs.dtype)
        coeffs = self._gram_evecs @ (coords * (weights / self.evals)[:, None])
        out = self._apply(coeffs * self._factor_scale)
        if damping != 0:
            out = [o + v.to(o.dtype) / damping for o, v in zip(out, stacked)]
        return [o[0] for o in out] if single else out

    def _require_factors(self):
        if not self._factors:
            raise RuntimeError(
                "Eigenvectors and Newton steps need the factor kept after the pass: "
                "include 'eigenvectors' or 'newton_step' in LowRankGGN(compute=...)."
            )

    def _require_grads(self):
        if not self._has_grads:
            raise RuntimeError(
                "Directional derivatives need per-sample gradients: include "
                "'directional_derivatives' or 'newton_step' in LowRankGGN(compute=...)."
            )
