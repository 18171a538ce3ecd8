"""The ``'pairwise'`` Gram plan: input kernels per sample pair, ``V`` never formed.

For a weight with backpropagated factor ``s`` ``[C, N, T, O]`` and layer input
``a`` ``[N, T, I]``, per pair of samples ``(n, m)`` the input kernel
``K_nm = a_n a_mᵀ`` ``[T, T]`` gives
``⟨v_cn, v_dm⟩ = Σ_{t,u,o} s_cnto K_nm,tu s_dmuo``: ``N²·T²·I / 2`` for the
kernels, ``N²·T²·C·O / 2`` for ``P = K s`` and ``N²·C²·T·O / 2`` for the
Gram entries -- cheap when the layer has few positions compared with its
weight size (late convolutions). With the output gradients ``Δ`` as an extra
column of ``s``, ``Vᵀ g`` comes out of the same products.

The operands are laid out for the GEMMs as ``S[n] = [(t, o), d]`` (``s`` and
``Δ``) and ``A = [(n, t), i]`` (``a``): once for all samples when both
copies fit the chunk budget (the default), else a block of samples at a time
(:class:`_SampleBlocks`), so that under a small ``max_memory`` the plan holds
two blocks instead of copies of the whole factor and input. The numbers do
not depend on the blocks. So the plan also takes ``s`` given a block of
samples at a time (:class:`FactorBlocks`: a factor formed from a lazy source,
never held whole) and ``a`` given so
(:class:`~vivitlib.factors.kernels.InputBlocks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from vivitlib.factors.kernels import InputBlocks, SampleBlocks, _chunk, whole_input


class FactorBlocks(SampleBlocks):
    """``s`` ``[C, N, T, O]`` given a block of samples at a time instead of whole.

    For a factor never held whole (formed from a lazy source,
    :class:`~vivitlib.extensions.lazy_factor.SampleBlockedFactor`):
    :func:`pairwise_gram` asks for the blocks it lays out, each formed anew on
    every request (time traded for memory).

    Args:
        shape: ``(C, N, T, O)``.
        take: ``take(n0, n1)`` gives ``s[:, n0:n1]``, ``[C, n1 - n0, T, O]``.
        like: A tensor with the blocks' dtype and device.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        take: Callable[[int, int], Tensor],
        like: Tensor,
    ):
        self.shape, self.take, self._like = tuple(shape), take, like

    def new_empty(self, *shape: int) -> Tensor:
        """An uninitialised tensor with the blocks' dtype and device."""
        return self._like.new_empty(shape)


def _factor_block(s: Tensor | FactorBlocks, n0: int, n1: int) -> Tensor:
    """``s[:, n0:n1]`` (a view of a tensor, formed for :class:`FactorBlocks`)."""
    return s.take(n0, n1) if isinstance(s, FactorBlocks) else s[:, n0:n1]


def _input_block(a: Tensor | InputBlocks, n0: int, n1: int) -> Tensor:
    """``a[n0:n1]`` (a view of a tensor, formed for ``InputBlocks``)."""
    return a.take(n0, n1) if isinstance(a, InputBlocks) else a[n0:n1]


def _laid_out(a: Tensor | InputBlocks) -> bool:
    """Whether ``a`` is its own layout ``[(n, t), i]`` (a contiguous tensor)."""
    return isinstance(a, Tensor) and a.is_contiguous()


def _sample_columns(
    s: Tensor, delta: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """``s`` ``[C, N, T, O]`` as one contiguous copy ``[N, T, O, C1]``.

    ``Δ`` ``[N, T, O]``, if given, becomes column ``C`` (``C1 = C + 1``, else
    ``C``). Per sample ``[(t, o), d]``: the layout both GEMMs of
    :func:`pairwise_gram` read. Written into ``out`` if given.
    """
    C, N, T, O = s.shape  # noqa: E741
    if out is None:
        out = s.new_empty(N, T, O, C + (delta is not None))
    out[..., :C].copy_(s.permute(1, 2, 3, 0))
    if delta is not None:
        out[..., C].copy_(delta)
    return out


class _SampleBlocks:
    """``A`` and ``S`` of samples ``[n0, n1)``: views of whole layouts, or block copies.

    Args:
        s: ``[C, N, T, O]``, or :class:`FactorBlocks` giving it block by block.
        a: ``[N, T, I]`` (a contiguous input is its own layout, never copied),
            or :class:`~vivitlib.factors.kernels.InputBlocks`.
        delta: ``[N, T, O]`` or ``None``.
        block: Samples per block, two blocks held (slots 0 and 1); ``None``
            lays out all samples once.
    """

    def __init__(
        self,
        s: Tensor | FactorBlocks,
        a: Tensor | InputBlocks,
        delta: Tensor | None,
        block: int | None,
    ):
        self.s, self.a, self.delta, self.whole = s, a, delta, block is None
        C, N, T, O = s.shape  # noqa: E741
        I = a.shape[-1]  # noqa: E741
        C1 = C + (delta is not None)
        if self.whole:
            self._s = _sample_columns(_factor_block(s, 0, N), delta)
            self._a = whole_input(a).reshape(N * T, I)
            return
        self._s = [s.new_empty(block, T, O, C1) for _ in range(2)]
        self._a = None
        if not _laid_out(a):
            self._a = [a.new_empty(block, T, I) for _ in range(2)]

    def __call__(self, n0: int, n1: int, slot: int) -> tuple[Tensor, Tensor]:
        """``(A [(n1 - n0)·T, I], S [n1 - n0, T, O, C1])``; ``slot`` 0 or 1."""
        T = self.a.shape[1]  # noqa: E741
        if self.whole:
            return self._a[n0 * T : n1 * T], self._s[n0:n1]
        d = None if self.delta is None else self.delta[n0:n1]
        s_block = _factor_block(self.s, n0, n1)
        s = _sample_columns(s_block, d, self._s[slot][: n1 - n0])
        del s_block
        if self._a is None:
            return self.a[n0:n1].view((n1 - n0) * T, -1), s
        a = self._a[slot][: n1 - n0].copy_(_input_block(self.a, n0, n1))
        return a.view((n1 - n0) * T, -1), s


def _blocks(N: int, T: int, per_sample: int, budget: int) -> tuple[int | None, int]:
    """``(block, step)``: samples per laid-out block (``None``: all), per kernel chunk.

    All samples laid out once, plus the kernel rows ``n ≥ m0`` of ``step``
    columns, when that fits ``budget``; else two blocks of ``b`` samples and
    a ``b × b`` kernel block, ``2·b·L + b²·T² ≤ budget`` (``L = per_sample``
    laid-out entries), at least one sample.
    """
    # kernel columns: at least 8 chunks, so that the kernel's work is about
    # 9/16 of the full N·T × N·T product, not all of it
    most = -(-N // 8)
    step = min(_chunk(N * T * T, N, budget), most)
    if N * per_sample + N * T * step * T <= budget:
        return None, step
    root = math.sqrt(per_sample**2 + budget * T * T)
    b = max(1, min(most, int((root - per_sample) / (T * T))))
    return b, b


class _Accumulator:
    """Sample-major Gram (and ``Vᵀ g``) filled block by block, with GEMM workspaces.

    Args:
        s: ``[C, N, T, O]`` or :class:`FactorBlocks` (shapes, dtype, device).
        C1: Columns of ``S`` (``C``, or ``C + 1`` with ``Δ``).
        kernel_entries: Largest kernel block.
        rows_step: Samples ``n`` per product ``P = K S_m``.
    """

    def __init__(
        self, s: Tensor | FactorBlocks, C1: int, kernel_entries: int, rows_step: int
    ):
        C, N, T, O = s.shape  # noqa: E741
        self.C, self.T, self.rows_step = C, T, rows_step
        self.gram = s.new_empty(N, C, N, C)
        self.vtg = s.new_empty(N, C, N) if C1 > C else None
        # written by every GEMM in turn: no allocation inside the loops
        self.kernel_space = s.new_empty(kernel_entries)
        self.p_space = s.new_empty(rows_step * T * O * C1)

    def add(
        self, rows: Tensor, s_n: Tensor, r0: int, cols: Tensor, s_m: Tensor, m0: int
    ):
        """Entries ``(n, m)`` for ``n ≥ m``, ``n`` from ``r0``, ``m`` from ``m0``.

        Args:
            rows: ``A`` of the samples ``n``, ``[(n, t), i]``.
            s_n: ``S`` of the samples ``n``, ``[n, T, O, C1]``.
            r0: First sample ``n``.
            cols: ``A`` of the samples ``m``, ``[(m, u), i]``.
            s_m: ``S`` of the samples ``m``, ``[m, T, O, C1]``.
            m0: First sample ``m``.
        """
        C, T, rows_step = self.C, self.T, self.rows_step
        r1, m1, C1 = r0 + s_n.shape[0], m0 + s_m.shape[0], s_n.shape[-1]
        s_n = s_n.view(r1 - r0, -1, C1)  # [n, (t, o), d]
        s_m = s_m.view(m1 - m0, T, -1)  # [m, u, (o, d)]
        kernel = self.kernel_space[: rows.shape[0] * cols.shape[0]]
        kernel = torch.mm(rows, cols.T, out=kernel.view(len(rows), -1))
        for m in range(m0, m1):
            k_m = kernel[:, (m - m0) * T : (m - m0 + 1) * T]  # [(n, t), u]
            for n0 in range(max(m, r0), r1, rows_step):
                n1 = min(r1, n0 + rows_step)
                p = self.p_space[: (n1 - n0) * s_m[0].numel()]
                p = p.view((n1 - n0) * T, -1)
                torch.mm(k_m[(n0 - r0) * T : (n1 - r0) * T], s_m[m - m0], out=p)
                # [n, c, d]; with Δ as row and column C also ⟨v_cn, g_m⟩, ⟨g_n, v_dm⟩
                part = s_n[n0 - r0 : n1 - r0].transpose(1, 2)
                entries = torch.bmm(part, p.view(n1 - n0, -1, C1))
                self.gram[n0:n1, :, m] = entries[:, :C, :C]
                if self.vtg is not None:
                    self.vtg[n0:n1, :, m] = entries[:, :C, C]
                    self.vtg[m, :, n0:n1] = entries[:, C, :C].T

    def mirror(self, m0: int, m1: int) -> None:
        """Fill entries ``(m, n)``, ``n > m``, of the samples ``m`` in ``[m0, m1)``."""
        for m in range(m0, m1):
            self.gram[m, :, m + 1 :] = self.gram[m + 1 :, :, m].permute(2, 0, 1)


def pairwise_gram(
    s: Tensor | FactorBlocks,
    a: Tensor | InputBlocks,
    delta: Tensor | None = None,
    *,
    chunk_elements: int,
    workspace_elements: int,
) -> tuple[Tensor, Tensor | None]:
    """Gram matrix (and optionally ``Vᵀ g``) through pairwise input kernels.

    Every step is a plain or batched matrix product on laid-out operands (no
    permuted copies inside the loops). For a chunk of samples ``m``: per
    block of samples ``n ≥ m0`` the kernel rows ``K[(n, t), (m, u)]`` (one
    GEMM); per ``m``, ``P_m = K[:, m] S_m`` (``[(n, t), (o, d)]``, one GEMM)
    and ``gram[n, :, m, :] = S_nᵀ P_m[n]`` (one batched GEMM over ``n``).
    ``Vᵀ g`` comes from the same products: the ``Δ`` column gives
    ``⟨v_cn, g_m⟩`` and the ``Δ`` row ``⟨v_dm, g_n⟩``, so the kernel's upper
    half is never needed.

    Operands given block by block (:class:`FactorBlocks`,
    :class:`~vivitlib.factors.kernels.InputBlocks`) are formed block by block
    into the layout, every time a block is laid out (with blocks of samples:
    about ``B·(B + 1)/2`` times for ``B`` blocks; all samples once when the
    layout fits ``chunk_elements``). The numbers are the same.

    Args:
        s: Backpropagated factor ``[C, N, T, O]``, or :class:`FactorBlocks`.
        a: Layer input ``[N, T, I]``, shared by the factor and the gradients,
            or :class:`~vivitlib.factors.kernels.InputBlocks`.
        delta: Output gradients ``[N, T, O]`` of the same samples, or ``None``.
        chunk_elements: Largest laid-out operands plus kernel block (entries).
        workspace_elements: Size of the per-sample products on the CPU.

    Returns:
        ``(gram, vtg)``: ``[C, N, C, N]`` and ``[C, N, N]`` (``None`` without
        ``delta``), class-major views of sample-major buffers.
    """
    C, N, T, O = s.shape  # noqa: E741
    C1 = C + (delta is not None)
    per_sample = T * (O * C1 + (0 if _laid_out(a) else a.shape[-1]))
    block, step = _blocks(N, T, per_sample, chunk_elements)
    blocks = _SampleBlocks(s, a, delta, block)
    row_block = N if block is None else block
    # the CPU reuses a small workspace from cache; accelerators prefer fewer launches
    workspace = chunk_elements
    if s.device.type == "cpu":
        workspace = min(workspace, workspace_elements)
    rows_step = _chunk(T * O * C1, N, workspace)
    acc = _Accumulator(s, C1, row_block * T * step * T, rows_step)
    for m0 in range(0, N, step):
        m1 = min(N, m0 + step)
        cols, s_m = blocks(m0, m1, 0)
        for r0 in range(m0, N, row_block):
            r1 = min(N, r0 + row_block)
            same = not blocks.whole and r0 == m0
            rows, s_n = (cols, s_m) if same else blocks(r0, r1, 1)
            acc.add(rows, s_n, r0, cols, s_m, m0)
        acc.mirror(m0, m1)
    gram = acc.gram.permute(1, 0, 3, 2)
    return gram, None if acc.vtg is None else acc.vtg.transpose(0, 1)


def pairwise_times_grads(
    s: Tensor, a: Tensor, delta: Tensor, a_grad: Tensor, *, chunk_elements: int
) -> Tensor:
    """``Vᵀ g_m`` through pairwise kernels, inputs of the gradients ``a_grad``.

    Args:
        s: ``[C, N, T, O]``.
        a: ``[N, T, I]``.
        delta: ``[N', T, O]``.
        a_grad: ``[N', T, I]``.
        chunk_elements: Largest kernel block (entries).

    Returns:
        ``[C, N, N']`` (a class-major view).
    """
    C, N, T, O = s.shape  # noqa: E741
    N_g = delta.shape[0]
    s_k = _sample_columns(s).view(N, T * O, C).transpose(1, 2)  # [n, c, (t, o)]
    a_rows = a.reshape(N * T, a.shape[-1])
    out = s.new_empty(N, C, N_g)
    step = _chunk(N * T * max(O, T), N_g, chunk_elements)
    for m0 in range(0, N_g, step):
        m1 = min(N_g, m0 + step)
        M = m1 - m0
        kernel = a_rows @ a_grad[m0:m1].reshape(M * T, -1).T
        kernel = kernel.reshape(N * T, M, T).transpose(0, 1)
        q = torch.bmm(kernel, delta[m0:m1]).reshape(M, N, T * O)
        out[:, :, m0:m1] = torch.bmm(s_k, q.permute(1, 2, 0))
    return out.transpose(0, 1)
