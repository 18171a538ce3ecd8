"""Study 7 end to end in a tiny configuration, its resume, and the GGN variance."""

import torch
from torch.func import functional_call, hessian, jacrev

import experiments.gradient_variance.run as study
from experiments.common.curvature import low_rank_ggn
from experiments.common.spectrum import THRESHOLDS, tag
from experiments.gradient_variance.compute import (
    ggn_sample_variance,
    hessian_sample_variance,
)
from experiments.problems import get_problem, make_extended, mlp
from experiments.problems.data import load_digits
from tests.experiments.utils import assert_finite, assert_resumes, tiny_training

ARGV = [
    *tiny_training(eval_batch=8),
    "--num-batches",
    "2",
    "--top-k",
    "5",
    "--probes",
    "4",
]


def test_variance_study_table_and_resume(monkeypatch, tmp_path):
    table = assert_resumes(
        monkeypatch, study.main, ARGV, tmp_path, study, "variance_table", call=3
    )
    shares = [f"lambda_snr_gt1_share_{tag(f)}" for f in THRESHOLDS]
    hessian = [
        "hessian_lambda_max",
        "hessian_trace",
        "hessian_frobenius",
        "hessian_sample_var",
    ]
    assert_finite(
        table,
        [
            "grad_norm_sq",
            "grad_var_trace",
            "eigenvalue",
            "lambda_var",
            "ggn_frobenius",
            "ggn_sample_var",
            *shares,
            *hessian,
        ],
    )
    assert set(table["batch"]) == {0, 1} and set(table["optimizer"]) == {"sgd", "adam"}
    assert (table["grad_var_trace"] > 0).all() and (table["lambda_var"] >= 0).all()
    assert (table["ggn_sample_var"] >= 0).all()
    assert (table["hessian_sample_var"] >= 0).all()
    assert table.groupby(["optimizer", "step", "batch"]).size().max() <= 5
    assert table[shares].stack().between(0, 1).all()
    # logistic regression: the Hessian is the GGN, whose top eigenvalue vivitlib has
    top = table[table["k"] == 0]
    assert (
        (top["hessian_lambda_max"] - top["eigenvalue"]).abs()
        <= 1e-6 * top["eigenvalue"]
    ).all()
    # Frobenius norm of the Hessian (Hutchinson) vs the exact one of the GGN
    ratio = top["hessian_frobenius"] / top["ggn_frobenius"]
    assert ratio.between(0.3, 3).all()
    assert (tmp_path / "ref" / "variance_digits_logreg.png").exists()


def test_ggn_sample_variance_matches_dense_per_sample_ggns():
    data = load_digits()
    inputs, labels = data.test_x[:5].double(), data.test_y[:5]
    problem = get_problem("digits_mlp")
    model, loss_fn = make_extended(problem, (1, 8, 8), 10, seed=2)
    model.double()
    ggn = low_rank_ggn(model, loss_fn, inputs, labels, compute=("eigenvalues",))
    result = ggn_sample_variance(ggn.blocks[0].gram, len(labels))

    plain = problem.make_model((1, 8, 8), 10).double()
    plain.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in plain.named_parameters()}
    jac = jacrev(lambda p: functional_call(plain, p, (inputs,)))(params)
    jac = torch.cat([j.flatten(start_dim=2) for j in jac.values()], dim=2)
    probs = plain(inputs).softmax(1).detach()
    per_sample = torch.stack(
        [j.T @ (torch.diag(p) - torch.outer(p, p)) @ j for j, p in zip(jac, probs)]
    )
    mean = per_sample.mean(0)
    expected_var = (per_sample - mean).square().sum((1, 2)).mean().item()
    expected_norm = mean.square().sum().sqrt().item()
    assert abs(result["ggn_sample_var"] - expected_var) <= 1e-9 * expected_var
    assert abs(result["ggn_frobenius"] - expected_norm) <= 1e-9 * expected_norm


def test_hessian_sample_variance_matches_dense_per_sample_hessians():
    data = load_digits()
    inputs, labels = data.test_x[:5].double(), data.test_y[:5]
    torch.manual_seed(3)
    model = mlp((1, 8, 8), 10, hidden=(4,)).double()
    loss_fn = torch.nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([v.reshape(-1) for v in params.values()])

    def per_sample_loss(vector, x, y):
        tensors, start = {}, 0
        for name, value in params.items():
            tensors[name] = vector[start : start + value.numel()].view_as(value)
            start += value.numel()
        return loss_fn(functional_call(model, tensors, (x[None],)), y[None])

    hessians = torch.stack(
        [hessian(per_sample_loss)(flat, x, y) for x, y in zip(inputs, labels)]
    )
    expected = (hessians - hessians.mean(0)).square().sum((1, 2)).mean().item()
    identity = torch.eye(len(flat), dtype=torch.float64)
    exact = hessian_sample_variance(model, loss_fn, inputs, labels, identity)
    assert abs(exact - expected) <= 1e-10 * expected
    # Rademacher probes: unbiased, close with many probes
    signs = torch.randint(
        0, 2, (len(flat), 400), generator=torch.Generator().manual_seed(0)
    )
    estimate = hessian_sample_variance(model, loss_fn, inputs, labels, 2.0 * signs - 1)
    assert abs(estimate / expected - 1) < 0.15
