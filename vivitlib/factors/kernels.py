"""Chunked contractions of outer-product factors, with bounded intermediates.

For a weight with backpropagated factor ``s`` ``[C, N, T, O]`` and layer input
``a`` ``[N, T, I]`` (``T`` positions), column ``(c, n)`` of ``V`` is
``v_cn = Σ_t s_cnt a_ntᵀ`` (an ``O × I`` matrix). Two ways to get the Gram
matrix ``⟨v_cn, v_dm⟩``:

* **dense** (here): form ``V`` (``C·N·T·O·I`` multiply-adds, one batched
  matmul per column ``c`` or per sample, no repeated input) a slice of
  outputs at a time and take ``VᵀV`` block by block, computing only blocks on
  and above the diagonal (``≈ (C·N)²·O·I / 2``);
* **pairwise** (:mod:`.pairwise`): per pair of samples ``(n, m)`` the input
  kernel ``K_nm = a_n a_mᵀ`` ``[T, T]``, then
  ``⟨v_cn, v_dm⟩ = Σ_{t,u,o} s_cnto K_nm,tu s_dmuo`` — costs
  ``N²·T²·I / 2 + N²·T²·C·O / 2 + N²·C²·T·O / 2``, cheap when the layer has
  few positions compared with its weight size (late convolutions).

Both run at matrix-multiply speed: operands are laid out before the loops,
which contain only (batched) GEMMs on views, never permuted copies. Both
process samples or outputs in chunks so that no intermediate exceeds the
chunk budget (in entries) beyond the outputs, and both use the symmetry of
the Gram matrix. Every function returns the library's one internal column
order, class-major ``(c, n)`` (BackPACK's): ``[C, N, C, N]`` Gram,
``[C, N, N']`` for ``Vᵀ g`` (possibly as permuted views of sample-major
buffers, never copies). Chunk budgets come from the caller
(:class:`~vivitlib.factors.costs.CostModel`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from vivitlib.linalg.gram import mirror_upper_


def _chunk(per_item: int, total: int, budget: int) -> int:
    """Items per chunk so that ``items · per_item <= budget`` (at least one)."""
    return max(1, min(total, budget // max(per_item, 1)))


def sym_gram(rows: Tensor) -> Tensor:
    """``R Rᵀ`` computing only blocks on and above the diagonal.

    Args:
        rows: ``[M, D]``.

    Returns:
        ``[M, M]``, symmetric.
    """
    out = rows.new_empty(rows.shape[0], rows.shape[0])
    add_sym_gram(rows, out, accumulate=False)
    return mirror_upper_(out)


def _row_blocks(M: int) -> range:
    return range(0, M, -(-M // (8 if M >= 256 else 1)))


def add_sym_gram(rows: Tensor, out: Tensor, accumulate: bool = True) -> Tensor:
    """Add (or write) the blocks of ``R Rᵀ`` on and above the diagonal to ``out``.

    Only the upper block triangle of ``out`` is touched;
    :func:`~vivitlib.linalg.gram.mirror_upper_` completes the matrix once all
    parts are in.

    Args:
        rows: ``[M, D]``.
        out: ``[M, M]``, row-major.
        accumulate: Add to ``out`` (else overwrite the touched blocks).
    """
    M = rows.shape[0]
    step = _row_blocks(M).step
    for i0 in _row_blocks(M):
        i1 = min(M, i0 + step)
        block = out[i0:i1, i0:]
        if accumulate:
            block.addmm_(rows[i0:i1], rows[i0:].T)
        else:
            torch.mm(rows[i0:i1], rows[i0:].T, out=block)
    return out


def outer_dense(s: Tensor, a: Tensor) -> Tensor:
    """Materialise ``V`` from its outer-product factors, BackPACK order.

    Args:
        s: ``[C, N, T, O]``.
        a: ``[N, T, I]``.

    Returns:
        ``[C, N, O·I]``.
    """
    C, N, _, O = s.shape  # noqa: E741
    out = s.new_empty(C, N, O, a.shape[-1])
    for c in range(C):
        torch.bmm(s[c].transpose(1, 2), a, out=out[c])
    return out.flatten(2)


#: Inner dimension (outputs × inputs per slice) below which a slice's Gram
#: product runs far below GEMM speed (measured: 3C3D's first convolution).
MIN_GRAM_INNER = 2048


def _per_class(C: int, N: int, T: int, O: int, I: int, budget: int) -> bool:  # noqa: E741
    """Whether to form ``V``'s output slices class by class (see :func:`_slice_former`).

    Sample by sample needs a sample-major copy of ``s``'s slice, which with
    many positions (``T > I``) takes most of the budget; class by class
    needs no copy (more outputs per slice) but its products have ``C`` times
    fewer rows. It is used only where the copy would leave slices too thin for
    a fast Gram product (fewer than :data:`MIN_GRAM_INNER` inner entries).
    """
    sample_step = _chunk(C * N * (I + T), O, budget)
    class_step = _chunk(C * N * I, O, budget)
    return sample_step * I < MIN_GRAM_INNER and class_step > sample_step


class OutputSlices:
    """``s`` ``[C, N, T, O]`` given slice by slice instead of whole.

    For a factor that is never held whole (formed from a lazy source a slice
    of outputs at a time): :func:`dense_plan_gram` asks for each slice once.

    Args:
        shape: ``(C, N, T, O)``.
        take: ``take(o0, o1)`` gives ``s[..., o0:o1]``, ``[C, N, T, o1 - o0]``.
    """

    def __init__(
        self, shape: tuple[int, int, int, int], take: Callable[[int, int], Tensor]
    ):
        self.shape, self.take = tuple(shape), take


class SampleBlocks:
    """Base of tensors given a block of samples at a time (their dtype, device)."""

    _like: Tensor

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the blocks."""
        return self._like.dtype

    @property
    def device(self) -> torch.device:
        """Device of the blocks."""
        return self._like.device


class InputBlocks(SampleBlocks):
    """``a`` ``[N, T, I]`` given a block of samples at a time instead of whole.

    For an input never held whole: a convolution's unfolded input (``kernel
    size`` times its input) under a small ``max_memory``. Consumers that
    form ``V`` sample by sample (:func:`dense_plan_gram`) take the blocks in
    turn; each block is formed anew on every request (time traded for
    memory), so they hold one block at a time.

    Args:
        shape: ``(N, T, I)``.
        take: ``take(n0, n1)`` gives ``a[n0:n1]``, ``[n1 - n0, T, I]``.
        step: Samples per block.
        like: A tensor with the blocks' dtype and device.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        take: Callable[[int, int], Tensor],
        step: int,
        like: Tensor,
    ):
        self.shape, self.take, self.step, self._like = tuple(shape), take, step, like

    def numel(self) -> int:
        """Entries of the whole input."""
        N, T, I = self.shape  # noqa: E741
        return N * T * I

    def element_size(self) -> int:
        """Bytes per entry."""
        return self._like.element_size()

    def new_empty(self, *shape: int) -> Tensor:
        """An uninitialised tensor with the blocks' dtype and device."""
        return self._like.new_empty(shape)

    def new_zeros(self, *shape: int) -> Tensor:
        """A zero tensor with the blocks' dtype and device."""
        return self._like.new_zeros(shape)

    def blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        """``(n0, n1, a[n0:n1])`` for consecutive blocks covering all samples."""
        N = self.shape[0]
        for n0 in range(0, N, self.step):
            n1 = min(N, n0 + self.step)
            yield n0, n1, self.take(n0, n1)

    def whole(self) -> Tensor:
        """All of ``a`` (for what needs it whole, e.g. lifting)."""
        return self.take(0, self.shape[0])


def sample_blocks(a: Tensor | InputBlocks) -> Iterator[tuple[int, int, Tensor]]:
    """``(n0, n1, a[n0:n1])`` blocks of ``a``: one block for a tensor."""
    if isinstance(a, InputBlocks):
        yield from a.blocks()
    else:
        yield 0, a.shape[0], a


def whole_input(a: Tensor | InputBlocks) -> Tensor:
    """``a`` as one tensor (blocks are formed into it)."""
    return a.whole() if isinstance(a, InputBlocks) else a


def _slice_taker(s: Tensor | OutputSlices) -> Callable[[int, int], Tensor]:
    """``take(o0, o1)`` giving ``s[..., o0:o1]`` (a view of a tensor ``s``).

    A formed slice is transient (it is laid out into the workspace at once),
    so the slice budget does not count it.
    """
    if isinstance(s, OutputSlices):
        return s.take
    return lambda o0, o1: s[..., o0:o1]


def _slice_former(s: Tensor | OutputSlices, a: Tensor | InputBlocks, budget: int):
    """``(step, form, class_major)``: ``form(o0, o1)`` gives ``V``'s output slice.

    The rows are ``[C·N, (o1 - o0)·I]``, class-major (class by class, straight
    from BackPACK's class-major ``s``, one batched product per class) or
    sample-major (one batched product over samples from a sample-major copy
    of the slice of ``s``), chosen by :func:`_per_class`. Every slice is
    written into one workspace (no allocation per slice). An input given in
    blocks (:class:`InputBlocks`) is taken block by block for every slice.
    """
    C, N, T, O = s.shape  # noqa: E741
    I = a.shape[-1]  # noqa: E741
    take = _slice_taker(s)
    if _per_class(C, N, T, O, I, budget):
        # a slice formed from a lazy factor is new memory as well: count it
        formed = T if isinstance(s, OutputSlices) else 0
        step = _chunk(C * N * (I + formed), O, budget)
        space = a.new_empty(C * N * step * I)

        def form(o0: int, o1: int) -> Tensor:
            out = space[: C * N * (o1 - o0) * I].view(C, N, o1 - o0, I)
            part = take(o0, o1)
            for n0, n1, block in sample_blocks(a):
                for c in range(C):
                    lhs = part[c, n0:n1].transpose(1, 2)
                    torch.bmm(lhs, block, out=out[c, n0:n1])
            return out.view(C * N, -1)

        return step, form, True
    # per output: a column slice of V and the copy of s laid out for the product
    step = _chunk(C * N * (I + T), O, budget)
    space = a.new_empty(C * N * step * I)
    copy = a.new_empty(C * N * step * T)

    def form(o0: int, o1: int) -> Tensor:
        w = o1 - o0
        s_rows = copy[: C * N * w * T].view(N, C, w, T)
        s_rows.copy_(take(o0, o1).permute(1, 0, 3, 2))
        out = space[: C * N * w * I].view(N, C * w, I)
        lhs = s_rows.view(N, C * w, T)
        for n0, n1, block in sample_blocks(a):
            torch.bmm(lhs[n0:n1], block, out=out[n0:n1])
        return out.view(N * C, w * I)

    return step, form, False


def dense_plan_gram(
    s: Tensor | OutputSlices,
    a: Tensor | InputBlocks,
    grads: Callable[[int, int], Tensor] | None,
    *,
    chunk_elements: int,
) -> tuple[Tensor, Tensor | None]:
    """Gram matrix (and ``Vᵀ g``) by forming ``V`` a slice of outputs at a time.

    The same multiply-adds as forming all of ``V`` first, but no slice of it
    (with the slice of ``s`` laid out to form it) exceeds ``chunk_elements``
    entries: slice ``[o0, o1)`` of every column is formed into a workspace
    (class by class or sample by sample, :func:`_per_class`), its products
    are added to the Gram matrix's upper block triangle and to
    ``Vᵀ g``.

    Args:
        s: ``[C, N, T, O]``, or :class:`OutputSlices` giving it slice by slice.
        a: ``[N, T, I]``, or :class:`InputBlocks` giving it block by block.
        grads: ``grads(o0, o1)`` gives the per-sample gradients' slice
            ``[N', (o1 - o0)·I]`` of the same outputs, or ``None``.
        chunk_elements: Largest slice of ``V`` (entries).

    Returns:
        ``(gram, vtg)``: ``[C, N, C, N]`` and ``[C, N, N']`` (or ``None``),
        class-major (possibly as views of sample-major buffers).
    """
    C, N, T, O = s.shape  # noqa: E741
    step, form, class_major = _slice_former(s, a, chunk_elements)
    gram = a.new_zeros(N * C, N * C)
    vtg = None
    for o0 in range(0, O, step):
        o1 = min(O, o0 + step)
        rows = form(o0, o1)
        add_sym_gram(rows, gram)
        if grads is not None:
            part = rows @ grads(o0, o1).T
            vtg = part if vtg is None else vtg.add_(part)
    gram = mirror_upper_(gram)
    if class_major:
        return gram.view(C, N, C, N), None if vtg is None else vtg.view(C, N, -1)
    gram = gram.view(N, C, N, C).permute(1, 0, 3, 2)
    return gram, None if vtg is None else vtg.view(N, C, -1).transpose(0, 1)


def positions_fastest(a: Tensor) -> bool:
    """Whether ``a`` ``[N, T, I]`` has its positions innermost in memory.

    A convolution's unfolded input is a transposed view of ``[N, I, T]``
    (:func:`~vivitlib.extensions.layers.conv_inputs`): ``(n, t)`` do not
    merge into one row axis, so an ``einsum`` contracting over them or over
    ``i`` first copies the whole input.
    """
    return a.dim() == 3 and a.shape[1] > 1 and a.stride(1) == 1 and a.stride(2) != 1


def _per_sample(a: Tensor, rows: int) -> bool:
    """Whether to read ``a`` in place, one product per sample, for ``rows`` outputs.

    Only with positions innermost (:func:`positions_fastest`) and more
    positions than ``rows`` (``K·O``, or as many): then the per-sample results
    (``N·K·O·I``) are smaller than the copy of ``a`` (``N·T·I``) an ``einsum``
    makes, and the products are tall (a VGG-like first block at ``N = 64``:
    the gradient total in 16 ms instead of 74 ms, no 75 MiB copy). With few
    positions and many outputs (ResNet-18's last block: ``T = 16``, ``O =
    512``) the copy is the cheaper part and one large product the faster.
    """
    return positions_fastest(a) and rows <= a.shape[1]


def position_sums(u: Tensor, a: Tensor, *, chunk_elements: int) -> Tensor:
    """``Σ_{n,t} u[k, n, t, o] a[n, t, i]`` as ``[K, O, I]``.

    Where :func:`_per_sample` says so, per-sample products summed over blocks
    of samples (each block's ``[n, K·O, I]`` within ``chunk_elements``),
    reading ``a`` in place; otherwise one ``einsum``.

    Args:
        u: ``[K, N, T, O]``.
        a: ``[N, T, I]``.
        chunk_elements: Largest intermediate (entries).
    """
    K, N, T, O = u.shape  # noqa: E741
    if not _per_sample(a, K * O):
        return torch.einsum("knto,nti->koi", u, a)
    I = a.shape[-1]  # noqa: E741
    if K == 1:
        lhs = u[0].transpose(1, 2)  # [N, O, T], a view
    else:
        lhs = u.permute(1, 0, 3, 2).reshape(N, K * O, T)
    out = a.new_zeros(K * O, I)
    step = _chunk(K * O * I, N, chunk_elements)
    for n0 in range(0, N, step):
        out += torch.bmm(lhs[n0 : n0 + step], a[n0 : n0 + step]).sum(0)
    return out.view(K, O, I)


def input_products(d: Tensor, a: Tensor) -> Tensor:
    """``Σ_i d[k, o, i] a[n, t, i]`` as ``[K, N, T, O]`` (possibly a permuted view).

    Where :func:`_per_sample` says so, one batched product per sample reading
    ``a`` in place, laid out ``[N, T, K, O]`` so that ``(t, o)`` still merge;
    otherwise one ``einsum``.

    Args:
        d: ``[K, O, I]``.
        a: ``[N, T, I]``.
    """
    K, O, I = d.shape  # noqa: E741
    if not _per_sample(a, K * O):
        return torch.einsum("koi,nti->knto", d, a)
    N, T = a.shape[:2]
    rows = d.reshape(K * O, I).T.expand(N, I, K * O)
    return torch.bmm(a, rows).view(N, T, K, O).permute(2, 0, 1, 3)


def grads_dense(delta: Tensor, a: Tensor) -> Tensor:
    """Per-sample gradients ``Σ_t δ_nt a_ntᵀ`` as ``[N', O·I]``."""
    return torch.bmm(delta.transpose(1, 2), a).flatten(1)
