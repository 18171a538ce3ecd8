"""Chunked factor contractions against the materialised computation."""

import pytest
import torch

from vivitlib.factors import kernels
from vivitlib.factors import representations as factors
from vivitlib.factors.representations import (
    DenseFactor,
    DenseGrads,
    OuterFactor,
    OuterGrads,
    contract,
    factor_apply,
    factor_times_grads,
)

PLANS = ("dense", "pairwise")


def _outer(C=3, N=5, T=4, O=3, I=6, seed=0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(C, N, T, O, generator=gen, dtype=torch.float64)
    a = torch.randn(N, T, I, generator=gen, dtype=torch.float64)
    delta = torch.randn(N, T, O, generator=gen, dtype=torch.float64)
    source = ("input", N, seed)
    return OuterFactor(s, a, source), OuterGrads(delta, a.clone(), source)


def _materialised(factor, grads):
    v = torch.einsum("cnto,nti->cnoi", factor.s, factor.a).flatten(2)
    g = torch.einsum("nto,nti->noi", grads.delta, grads.a).flatten(1)
    return v, g


@pytest.fixture(params=[None, 7], ids=["one-chunk", "small-chunks"])
def chunking(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", request.param)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("T", [1, 4])
def test_contract_matches_materialised(plan, T, chunking, monkeypatch):
    monkeypatch.setattr(factors, "outer_plan", lambda *a: "outer" if T == 1 else plan)
    factor, grads = _outer(T=T)
    v, g = _materialised(factor, grads)
    gram, vtg, kept = contract(factor, grads, keep=True)
    C, N = v.shape[:2]
    flat = v.reshape(C * N, -1)
    torch.testing.assert_close(gram.reshape(C * N, C * N), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    coeffs = torch.randn(C, N, 2, dtype=torch.float64)
    torch.testing.assert_close(
        factor_apply(kept, coeffs), torch.einsum("cnk,cnd->kd", coeffs, v)
    )


@pytest.mark.parametrize("plan", PLANS)
def test_grads_of_other_samples(plan, chunking, monkeypatch):
    """``Vᵀ g`` when the gradient samples differ from the curvature samples."""
    monkeypatch.setattr(factors, "outer_plan", lambda *a: plan)
    factor, _ = _outer(N=5)
    _, grads = _outer(N=3, seed=1)
    v, g = _materialised(factor, grads)
    _, vtg, _ = contract(factor, grads)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    torch.testing.assert_close(
        factor_times_grads(factor, grads), torch.einsum("cnd,md->cnm", v, g)
    )


@pytest.mark.parametrize("M", [7, 300])
def test_sym_gram(M):
    rows = torch.randn(M, 5, dtype=torch.float64)
    torch.testing.assert_close(kernels.sym_gram(rows), rows @ rows.T)


@pytest.mark.parametrize("sample_major", [False, True])
def test_dense_factor_in_either_layout(sample_major):
    C, N, D = 3, 4, 6
    v = torch.randn(C, N, D, dtype=torch.float64)
    stored = v.transpose(0, 1).contiguous().transpose(0, 1) if sample_major else v
    g = torch.randn(2, D, dtype=torch.float64)
    gram, vtg, _ = contract(DenseFactor(stored), DenseGrads(g))
    flat = v.reshape(C * N, D)
    torch.testing.assert_close(gram.reshape(C * N, C * N), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    coeffs = torch.randn(C, N, 2, dtype=torch.float64)
    torch.testing.assert_close(
        factor_apply(DenseFactor(stored), coeffs),
        torch.einsum("cnk,cnd->kd", coeffs, v),
    )


def test_keep_as_picks_smaller_representation():
    small_dense, _ = _outer(C=2, N=3, T=50, O=2, I=3)  # dense 36 vs outer 1050
    assert isinstance(factors.keep_as(small_dense), DenseFactor)
    large_dense, _ = _outer(C=2, N=3, T=2, O=20, I=40)  # dense 4800 vs outer 480
    assert isinstance(factors.keep_as(large_dense), OuterFactor)


def test_outer_plan_prefers_pairwise_for_few_positions():
    # 3C3D on CIFAR-10 at N=64: conv1/conv2 dense, conv3 pairwise
    assert factors.outer_plan(10, 64, 784, 64, 75) == "dense"
    assert factors.outer_plan(10, 64, 144, 96, 576) == "dense"
    assert factors.outer_plan(10, 64, 36, 128, 864) == "pairwise"
    assert factors.outer_plan(10, 64, 1, 512, 1152) == "outer"
