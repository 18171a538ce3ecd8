"""Papyan's A1/A2/B1/B2 spectra from Gram contractions vs a dense float64 reference."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from experiments.common.curvature import low_rank_ggn
from experiments.papyan_hierarchy.decomposition import (
    class_mean_gram,
    part_gram_sum,
    part_spectra,
)
from experiments.problems import make_extended, mlp
from experiments.problems.data import load_digits


class _Tiny:
    name, use_converter, has_batchnorm = "tiny", False, False

    @staticmethod
    def make_model(shape, classes):
        return mlp(shape, classes, hidden=(6,))

    @staticmethod
    def make_loss():
        return nn.CrossEntropyLoss()


def dense_parts(model, inputs, labels):
    """Papyan's parts built literally from the paper's class means and covariances."""
    model64 = _Tiny.make_model((1, 8, 8), 10).to(torch.float64)  # without BackPACK
    model64.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in model64.named_parameters()}

    def outputs(p):
        return functional_call(model64, p, (inputs.to(torch.float64),))

    jac = jacrev(outputs)(params)
    jac = torch.cat([j.flatten(start_dim=2) for j in jac.values()], dim=2)  # [N, C, D]
    probs = outputs(params).softmax(1).detach()
    num, classes = probs.shape
    eye = torch.eye(classes, dtype=torch.float64)
    g = torch.einsum("ncd,nkc->nkd", jac, eye[None] - probs[:, None, :])  # g[n, c']
    ggn = (
        sum(j.T @ (torch.diag(p) - torch.outer(p, p)) @ j for j, p in zip(jac, probs))
        / num
    )
    parts = {k: 0 for k in ("A1", "A2", "B1", "B2")}
    for c in labels.unique().tolist():
        members = labels == c
        mass = probs[members].sum(0)  # P[c, c']
        means = torch.einsum("nk,nkd->kd", probs[members], g[members]) / mass[:, None]
        others = [k for k in range(classes) if k != c]
        p_c = mass[others].sum()
        g_c = (mass[others, None] * means[others]).sum(0) / p_c
        parts["A1"] = parts["A1"] + p_c * torch.outer(g_c, g_c) / num
        parts["A2"] = parts["A2"] + mass[c] * torch.outer(means[c], means[c]) / num
        for k in others:
            diff = means[k] - g_c
            parts["B1"] = parts["B1"] + mass[k] * torch.outer(diff, diff) / num
        for k in range(classes):
            centred = g[members, k] - means[k]
            weights = probs[members, k]
            parts["B2"] = parts["B2"] + (weights[:, None] * centred).T @ centred / num
    return ggn, parts, probs, g


def _class_means(g, probs, labels):
    """Papyan's global class means g_c, built literally, for the present classes."""
    means = []
    for c in labels.unique().tolist():
        members = labels == c
        mass = probs[members].sum(0)
        pair = torch.einsum("nk,nkd->kd", probs[members], g[members]) / mass[:, None]
        others = [k for k in range(probs.shape[1]) if k != c]
        means.append((mass[others, None] * pair[others]).sum(0) / mass[others].sum())
    return torch.stack(means)


def _assert_same_spectrum(dense, contracted, scale):
    dense = torch.linalg.eigvalsh(dense).flip(0)
    dense = dense[dense > 1e-9 * scale]
    length = max(len(dense), len(contracted))
    pad = torch.zeros(length, dtype=torch.float64)
    a, b = pad.clone(), pad.clone()
    a[: len(dense)], b[: len(contracted)] = dense, contracted
    torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("num_samples,class_subset", [(24, None), (12, 4)])
def test_parts_match_dense_decomposition(num_samples, class_subset):
    data = load_digits()
    inputs, labels = data.test_x[:num_samples], data.test_y[:num_samples]
    if class_subset is not None:
        labels = labels % class_subset  # some classes absent from the batch
    model, loss_fn = make_extended(_Tiny, (1, 8, 8), 10, seed=1)
    ggn = low_rank_ggn(model, loss_fn, inputs, labels, compute=("eigenvalues",))
    gram = ggn.blocks[0].gram
    ggn_dense, parts_dense, probs, g = dense_parts(model, inputs, labels)

    total = sum(parts_dense.values())
    torch.testing.assert_close(total, ggn_dense, atol=1e-10, rtol=1e-8)
    identity = torch.eye(len(gram), dtype=torch.float64)
    torch.testing.assert_close(
        part_gram_sum(probs, labels), identity, atol=1e-10, rtol=0
    )

    spectra = part_spectra(gram, probs, labels, rtol=1e-10)
    scale = spectra["G"][0].item()
    _assert_same_spectrum(ggn_dense, spectra["G"], scale)
    for name, dense in parts_dense.items():
        _assert_same_spectrum(dense, spectra[name], scale)
    for name, dense in parts_dense.items():
        # G minus each part, against the dense difference
        _assert_same_spectrum(ggn_dense - dense, spectra[f"G-{name}"], scale)
    present = len(labels.unique())
    assert len(spectra["A1"]) <= present and len(spectra["A2"]) <= present
    assert len(spectra["B1"]) <= present * 9
    # removing a PSD part of rank r lowers the rank by at most r, never raises it
    # (ranks counted above the float32 Gram matrix's round-off)
    ranks = {name: int((v > 1e-6 * scale).sum()) for name, v in spectra.items()}
    for name in ("A1", "A2", "B1", "B2"):
        assert ranks["G"] - ranks[name] <= ranks[f"G-{name}"] <= ranks["G"]
    # Weyl: λ_k(G - X) <= λ_k(G)
    for name in ("A1", "A2", "B1", "B2"):
        minus = spectra[f"G-{name}"]
        assert (minus <= spectra["G"][: len(minus)] * (1 + 1e-8)).all()

    means = _class_means(g, probs, labels)
    torch.testing.assert_close(
        class_mean_gram(gram, probs, labels),
        means @ means.T,
        atol=1e-5 * means.square().sum(1).max().item(),
        rtol=1e-4,
    )
