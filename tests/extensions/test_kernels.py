"""Every factor representation and plan against the materialised computation."""

import pytest
import torch

from vivitlib.factors import (
    CostModel,
    DenseFactor,
    DenseGrads,
    KroneckerFactor,
    OuterFactor,
    OuterGrads,
    UnfoldedFactor,
    cost_model,
    kernels,
    outer_factor,
)

PLANS = ("dense", "pairwise")


def _outer(C=3, N=5, T=4, O=3, I=6, seed=0, conv_layout=False):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(C, N, T, O, generator=gen, dtype=torch.float64)
    a = torch.randn(N, T, I, generator=gen, dtype=torch.float64)
    if conv_layout:  # an unfolded convolution input: positions innermost
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
    delta = torch.randn(N, T, O, generator=gen, dtype=torch.float64)
    source = ("input", N, seed)
    return outer_factor(s, a, source), OuterGrads(delta, a.clone(), source)


def _materialised(factor, grads):
    v = torch.einsum("cnto,nti->cnoi", factor.s, factor.a).flatten(2)
    g = torch.einsum("nto,nti->noi", grads.delta, grads.a).flatten(1)
    return v, g


@pytest.fixture(params=[None, 7], ids=["one-chunk", "small-chunks"])
def chunking(request) -> dict:
    """Cost-model settings: default budgets, or budgets forcing many chunks."""
    if request.param is None:
        return {}
    return dict(chunk_elements=request.param, materialise_elements=request.param)


def test_outer_factor_picks_representation_by_positions():
    assert isinstance(_outer(T=1)[0], KroneckerFactor)
    assert isinstance(_outer(T=4)[0], UnfoldedFactor)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("conv_layout", [False, True], ids=["rows", "positions"])
def test_contract_matches_materialised(plan, T, keep, conv_layout, chunking):
    factor, grads = _outer(T=T, conv_layout=conv_layout)
    v, g = _materialised(factor, grads)
    with cost_model(gram_plan=plan, **chunking):
        gram, vtg, kept = factor.contract(grads, keep=keep)
        kept = factor if kept is None else kept
        lifted = kept.apply(coeffs := torch.randn(*v.shape[:2], 2).double())
        projected = factor.project(d := torch.randn(3, v.shape[-1]).double())
    C, N = v.shape[:2]
    flat = v.reshape(C * N, -1)
    torch.testing.assert_close(gram.reshape(C * N, C * N), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    torch.testing.assert_close(lifted, torch.einsum("cnk,cnd->kd", coeffs, v))
    torch.testing.assert_close(projected, torch.einsum("cnd,kd->cnk", v, d))
    torch.testing.assert_close(grads.project(d), g @ d.T)
    torch.testing.assert_close(grads.project(d[:1]), g @ d[:1].T)  # direct path
    torch.testing.assert_close(grads.total(), g.sum(0))


@pytest.mark.parametrize("chunk", [1, 40, 2**20])
@pytest.mark.parametrize("K", [1, 3])
def test_position_kernels_read_a_convolution_input_in_place(chunk, K):
    """Sums over positions and products over inputs equal the einsums.

    The unfolded convolution input (positions innermost) is read as it is:
    ``einsum`` would copy it whole first.
    """
    gen = torch.Generator().manual_seed(3)
    N, T, O, I = 5, 7, 2, 4  # noqa: E741  (K·O < T: read in place)
    rows = torch.randn(N, T, I, generator=gen, dtype=torch.float64)
    conv = rows.transpose(1, 2).contiguous().transpose(1, 2)
    assert kernels._per_sample(conv, K * O) and not kernels._per_sample(rows, K * O)
    u = torch.randn(K, N, T, O, generator=gen, dtype=torch.float64)
    d = torch.randn(K, O, I, generator=gen, dtype=torch.float64)
    sums = torch.einsum("knto,nti->koi", u, rows)
    products = torch.einsum("koi,nti->knto", d, rows)
    for a in (rows, conv):
        got = kernels.position_sums(u, a, chunk_elements=chunk)
        torch.testing.assert_close(got, sums)
        torch.testing.assert_close(kernels.input_products(d, a), products)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dense_grads", [False, True])
def test_grads_of_other_samples(plan, dense_grads, chunking):
    """``Vᵀ g`` when the gradient samples differ from the curvature samples."""
    factor, _ = _outer(N=5)
    _, grads = _outer(N=3, seed=1)
    v, g = _materialised(factor, grads)
    if dense_grads:
        grads = grads.dense()
    with cost_model(gram_plan=plan, **chunking):
        _, vtg, _ = factor.contract(grads)
        direct = factor.times_grads(grads)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    torch.testing.assert_close(direct, torch.einsum("cnd,md->cnm", v, g))


@pytest.mark.parametrize("T", [1, 4])
def test_per_sample_maps_and_scaling(T):
    """Selection, scaling and sizes agree with the dense form."""
    factor, grads = _outer(T=T)
    v, g = _materialised(factor, grads)
    index = torch.tensor([3, 0])
    take = lambda tensor, dim: tensor.index_select(dim, index)  # noqa: E731
    picked = factor.map_samples(take, "picked").scaled(2.0)
    torch.testing.assert_close(picked.dense().v, 2 * v[:, index])
    picked_grads = grads.map_samples(take, "picked", picked).scaled(3.0)
    torch.testing.assert_close(picked_grads.dense().g, 3 * g[index])
    assert picked_grads.a is picked.a and picked.shares_input(picked_grads)
    assert factor.dense_numel() == v.numel() and grads.dense_numel() == g.numel()
    assert factor.stored_numel() == factor.s.numel() + factor.a.numel()


def _backpack_strided(C, N, T, O, I, seed=0):  # noqa: E741
    """Factor and gradients with BackPACK's convolution strides (``T`` fastest)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(C, N, O, T, generator=gen, dtype=torch.float64).transpose(2, 3)
    a = torch.randn(N, I, T, generator=gen, dtype=torch.float64).transpose(1, 2)
    delta = torch.randn(N, O, T, generator=gen, dtype=torch.float64).transpose(1, 2)
    return outer_factor(s, a, "in"), OuterGrads(delta, a, "in")


@pytest.mark.parametrize("per_class", [True, False], ids=["per-class", "per-sample"])
@pytest.mark.parametrize(
    "budget", [None, 3 * 17 * (6 + 4) * 2], ids=["whole", "slices"]
)
def test_dense_plan_forms_slices_either_way(monkeypatch, per_class, budget):
    """Both ways of forming ``V``'s output slices give the materialised Gram."""
    monkeypatch.setattr(kernels, "_per_class", lambda *args: per_class)
    factor, grads = _backpack_strided(C=3, N=17, T=4, O=5, I=6)
    v, g = _materialised(factor, grads)
    settings = {} if budget is None else {"materialise_elements": budget}
    with cost_model(gram_plan="dense", **settings):
        gram, vtg, _ = factor.contract(grads)
    flat = v.reshape(-1, v.shape[-1])
    torch.testing.assert_close(gram.reshape(flat.shape[0], -1), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))


@pytest.mark.parametrize("per_class", [True, False], ids=["per-class", "per-sample"])
def test_dense_plan_from_output_slices(monkeypatch, per_class):
    """``s`` handed over slice by slice (a lazy factor) gives the same Gram, and
    every output is asked for exactly once."""
    monkeypatch.setattr(kernels, "_per_class", lambda *args: per_class)
    factor, grads = _backpack_strided(C=3, N=17, T=4, O=5, I=6, seed=2)
    v, g = _materialised(factor, grads)
    asked = []

    def take(o0, o1):
        asked.extend(range(o0, o1))
        return factor.s[..., o0:o1].clone()

    slices = kernels.OutputSlices(tuple(factor.s.shape), take)
    g_slices = lambda o0, o1: kernels.grads_dense(grads.delta[..., o0:o1], grads.a)  # noqa: E731
    gram, vtg = kernels.dense_plan_gram(
        slices, factor.a, g_slices, chunk_elements=3 * 17 * (6 + 4) * 2
    )
    flat = v.reshape(-1, v.shape[-1])
    torch.testing.assert_close(gram.reshape(flat.shape[0], -1), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    assert asked == list(range(5))


@pytest.mark.parametrize("budget", [None, 7, 4 * 4 * 3], ids=["one", "tiny", "some"])
def test_pairwise_plan_with_backpack_strides(budget):
    """The pairwise kernel (kernel chunks, row workspaces, ``Δ`` as an extra row)."""
    factor, grads = _backpack_strided(C=3, N=17, T=4, O=5, I=6, seed=1)
    v, g = _materialised(factor, grads)
    settings = {} if budget is None else dict(chunk_elements=budget)
    with cost_model(gram_plan="pairwise", workspace_elements=4 * 5 * 4 * 3, **settings):
        gram, vtg, _ = factor.contract(grads)
        alone, none, _ = factor.contract(None)
    flat = v.reshape(-1, v.shape[-1])
    torch.testing.assert_close(gram.reshape(flat.shape[0], -1), flat @ flat.T)
    torch.testing.assert_close(alone, gram)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    assert none is None


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
    gram, vtg, _ = DenseFactor(stored).contract(DenseGrads(g))
    flat = v.reshape(C * N, D)
    torch.testing.assert_close(gram.reshape(C * N, C * N), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    coeffs = torch.randn(C, N, 2, dtype=torch.float64)
    torch.testing.assert_close(
        DenseFactor(stored).apply(coeffs), torch.einsum("cnk,cnd->kd", coeffs, v)
    )


@pytest.mark.parametrize("plan", PLANS)
def test_kept_form_is_the_smaller_one(plan):
    with cost_model(gram_plan=plan):
        small_dense, _ = _outer(C=2, N=3, T=50, O=2, I=3)  # dense 36 vs outer 1050
        assert isinstance(small_dense.contract(None, keep=True)[2], DenseFactor)
        large_dense, _ = _outer(C=2, N=3, T=2, O=20, I=40)  # dense 4800 vs outer 480
        assert isinstance(large_dense.contract(None, keep=True)[2], OuterFactor)


def test_dense_plan_forms_thin_slices_class_by_class():
    # 3C3D's conv1 (T = 784 > I = 75) at N = 64, 256: the copy of s would leave
    # 15 / 3 outputs per 32 MiB slice; conv2 (I = 576) and ResNet-18's 64-channel
    # convolutions keep the sample-major products
    model = CostModel()
    for C, N, T, O, I, per_class in [(10, 64, 784, 64, 75, True),  # noqa: E741
                                      (10, 256, 784, 64, 75, True),
                                      (10, 64, 144, 96, 576, False),
                                      (10, 32, 1024, 64, 576, False)]:  # fmt: skip
        budget = model.slice_elements(C * N)
        assert kernels._per_class(C, N, T, O, I, budget) == per_class


def test_slices_are_halved_only_where_they_stay_wide():
    model = CostModel()
    full = model.materialise_elements
    assert model.slice_elements(576) == full // 2  # 3C3D at N = 64
    assert model.slice_elements(2304) == full  # N = 256: half is too thin
    assert model.slice_elements(1536) == 1536 * model.slice_inner  # in between
    small = CostModel(materialise_elements=50)  # set explicitly: kept
    assert small.slice_elements(576) == 50
    with pytest.raises(ValueError, match="slice_inner"):
        CostModel(slice_inner=0)


def test_gram_plan_prefers_pairwise_for_few_positions():
    # 3C3D on CIFAR-10 at N=64: conv1/conv2 dense, conv3 pairwise
    model = CostModel()
    assert model.gram_plan_for(10, 64, 784, 64, 75) == "dense"
    assert model.gram_plan_for(10, 64, 144, 96, 576) == "dense"
    assert model.gram_plan_for(10, 64, 36, 128, 864) == "pairwise"
    assert model.gram_plan_for(10, 64, 1, 512, 1152) == "outer"
    assert CostModel(gram_plan="dense").gram_plan_for(10, 64, 36, 128, 864) == "dense"


def test_cost_model_settings_are_validated_and_scoped():
    with pytest.raises(ValueError, match="gram_plan"):
        CostModel(gram_plan="fast")
    with pytest.raises(ValueError, match="chunk_elements"):
        CostModel(chunk_elements=0)
    with pytest.raises(ValueError, match="materialise_elements"):
        CostModel(materialise_elements=True)
    with pytest.raises(TypeError):
        with cost_model(no_such_setting=1):
            pass
    with cost_model(chunk_elements=5) as inner:
        assert inner.chunk_elements == 5
    from vivitlib.factors import current_cost_model

    assert current_cost_model() == CostModel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("same_memory", [True, False])
def test_linear_bias_reuses_the_weights_s_gram(dtype, same_memory):
    """A bias factor stored in the weight's ``s`` reuses ``⟨s, s⟩``; exact either way."""
    from vivitlib.block import GroupAccumulator

    factor, grads = _outer(C=3, N=4, T=1, O=5, I=6)
    s = factor.s.to(dtype)
    factor = outer_factor(s, factor.a.to(dtype), "in")
    bias = s[:, :, 0] if same_memory else s[:, :, 0].clone()
    assert factor.is_bias_factor(DenseFactor(bias)) == same_memory
    weight, b = torch.empty(5, 6), torch.empty(5)
    acc = GroupAccumulator(params=[weight, b], keep_factors=True)
    acc.add(weight, factor, None)
    acc.add(b, bias, None)
    v, _ = _materialised(factor, grads)
    full = torch.cat([v, bias[..., None, :].flatten(2)], -1).double().flatten(0, 1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    gram = acc.total_gram().flatten(0, 1).flatten(1)
    torch.testing.assert_close(gram, full @ full.T, **tol)
    assert acc._pending is None and set(acc.factors) == {id(weight), id(b)}


def test_bias_factor_changed_in_place_is_not_reused():
    """``s`` changed in place before the weight's Gram block is added is refused."""
    from vivitlib.block import GroupAccumulator

    factor, _ = _outer(C=2, N=3, T=1, O=4, I=2)
    bias = factor.s[:, :, 0]
    assert not factor.is_bias_factor(DenseFactor(factor.s[:, :2, 0]))
    weight, b = torch.empty(4, 2), torch.empty(4)
    acc = GroupAccumulator(params=[weight, b], keep_factors=False)
    acc.add(weight, factor, None)
    bias.mul_(2.0)  # same memory, new values
    assert not factor.is_bias_factor(DenseFactor(bias), acc._pending[2])
    with pytest.raises(RuntimeError, match="changed in place"):
        acc.add(b, bias, None)


def test_keep_dense_weighs_known_lifts():
    # 3C3D's second and first convolutions (C = 9 columns) at N = 64: a Newton
    # step alone (one lift) keeps the outer factors, ten lifts the dense V
    for dims in [(9, 64, 144, 96, 576), (9, 64, 784, 64, 75)]:
        assert CostModel().keep_dense(*dims)
        assert not CostModel(lifted_vectors=1).keep_dense(*dims)
        assert CostModel(lifted_vectors=10).keep_dense(*dims)
    # memory still decides first: conv3's V is too large whatever the lifts
    assert not CostModel(lifted_vectors=100).keep_dense(9, 64, 36, 128, 864)


@pytest.mark.parametrize("value", [-1, True, 1.5, "1"])
def test_lifted_vectors_is_validated(value):
    with pytest.raises(ValueError, match="lifted_vectors must be None or"):
        CostModel(lifted_vectors=value)


@pytest.mark.parametrize("lifts", [None, 1, 2])
def test_one_known_lift_keeps_the_outer_factor(lifts):
    """With one lift announced the kept factor stays outer; numbers unchanged."""
    factor, grads = _outer(C=2, N=3, T=50, O=2, I=3)  # dense V 36 vs factors 1050
    v, g = _materialised(factor, grads)
    with cost_model(gram_plan="dense", lifted_vectors=lifts):
        gram, vtg, kept = factor.contract(grads, keep=True)
    assert isinstance(kept, OuterFactor if lifts == 1 else DenseFactor)
    coeffs = torch.randn(2, 3, 4, dtype=torch.float64)
    flat = v.reshape(6, -1)
    torch.testing.assert_close(gram.reshape(6, 6), flat @ flat.T)
    torch.testing.assert_close(vtg, torch.einsum("cnd,md->cnm", v, g))
    torch.testing.assert_close(
        kept.apply(coeffs), torch.einsum("cnk,cnd->kd", coeffs, v)
    )
