"""The ``'pairwise'`` Gram plan laid out whole or a block of samples at a time."""

import pytest
import torch

from vivitlib.factors import pairwise

C, N, T, O, I = 3, 40, 4, 5, 6  # noqa: E741 (8 kernel chunks of 5 samples)


def _inputs(strided: bool, seed: int = 0):
    """``s``, ``a``, ``Δ`` in float64, with BackPACK's strides or contiguous."""
    gen = torch.Generator().manual_seed(seed)
    if strided:  # positions fastest, as BackPACK hands convolutions over
        s = torch.randn(C, N, O, T, generator=gen, dtype=torch.float64).transpose(2, 3)
        a = torch.randn(N, I, T, generator=gen, dtype=torch.float64).transpose(1, 2)
        delta = torch.randn(N, O, T, generator=gen, dtype=torch.float64)
        return s, a, delta.transpose(1, 2)
    s = torch.randn(C, N, T, O, generator=gen, dtype=torch.float64)
    a = torch.randn(N, T, I, generator=gen, dtype=torch.float64)
    return s, a, torch.randn(N, T, O, generator=gen, dtype=torch.float64)


def _reference(s, a, delta):
    """Dense ``V`` and per-sample gradients, their Gram and ``Vᵀ g``."""
    v = torch.einsum("cnto,nti->cnoi", s, a).reshape(C * N, -1)
    g = torch.einsum("nto,nti->noi", delta, a).reshape(N, -1)
    return (v @ v.T).view(C, N, C, N), (v @ g.T).view(C, N, N)


def _per_sample(a: torch.Tensor) -> int:
    """Entries laid out per sample (``S`` with ``Δ``, ``A`` unless contiguous)."""
    return T * (O * (C + 1) + (0 if a.is_contiguous() else I))


@pytest.mark.parametrize(
    "strided", [True, False], ids=["backpack-strides", "contiguous"]
)
@pytest.mark.parametrize("budget", [None, 1, 3, 5], ids=["whole", "b1", "b3", "b5"])
def test_blocks_give_the_dense_gram(strided, budget):
    """Whole layouts and blocks of 1, 3 and 5 samples give the same numbers."""
    s, a, delta = _inputs(strided)
    chunk = 2**24
    if budget is not None:  # room for two blocks of `budget` samples, not more
        chunk = 2 * budget * _per_sample(a) + (budget * T) ** 2
        assert pairwise._blocks(N, T, _per_sample(a), chunk)[0] == budget
    gram_ref, vtg_ref = _reference(s, a, delta)
    gram, vtg = pairwise.pairwise_gram(
        s, a, delta, chunk_elements=chunk, workspace_elements=2 * T * O * (C + 1)
    )
    torch.testing.assert_close(gram, gram_ref)
    torch.testing.assert_close(vtg, vtg_ref)
    alone, none = pairwise.pairwise_gram(
        s, a, chunk_elements=chunk, workspace_elements=2 * T * O * C
    )
    torch.testing.assert_close(alone, gram_ref)
    assert none is None


def test_small_budget_lays_out_blocks_not_the_factor(monkeypatch):
    """Under a small budget no copy of the whole factor or input is made."""
    s, a, delta = _inputs(strided=True, seed=1)
    laid_out = []
    real = pairwise._sample_columns

    def spy(s_part, *args, **kwargs):
        laid_out.append(s_part.shape[1])
        return real(s_part, *args, **kwargs)

    monkeypatch.setattr(pairwise, "_sample_columns", spy)
    created = []
    real_empty = torch.Tensor.new_empty

    def new_empty(self, *size, **kwargs):
        out = real_empty(self, *size, **kwargs)
        created.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    chunk = 2 * 2 * _per_sample(a) + (2 * T) ** 2  # two blocks of two samples
    gram, vtg = pairwise.pairwise_gram(
        s, a, delta, chunk_elements=chunk, workspace_elements=chunk
    )
    gram_ref, vtg_ref = _reference(s, a, delta)
    torch.testing.assert_close(gram, gram_ref)
    torch.testing.assert_close(vtg, vtg_ref)
    assert max(laid_out) == 2
    # workspaces: the two blocks and kernel (chunk) and the products P (at most
    # the chunk), far below one layout of all samples
    outputs = (N * C) ** 2 + N * C * N
    assert sum(created) - outputs <= 2 * chunk < N * _per_sample(a)


def test_default_budget_lays_out_3c3d_once():
    """3C3D's last convolution at N = 64 (C = 9 columns): one layout, 8 chunks."""
    per_sample = 36 * (128 * 9 + 864)
    assert pairwise._blocks(64, 36, per_sample, 2**24) == (None, 8)
    # a budget of 38 MB leaves blocks of 7 samples
    assert pairwise._blocks(64, 36, per_sample, 38_156_288 // 32)[0] == 7
