"""A torchvision ResNet-18 (10 classes) through BackPACK's converter runs end to end."""

import pytest
import torch
from backpack import backpack, extend

import vivitlib

torchvision = pytest.importorskip("torchvision")


def test_resnet18_through_converter():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(model.state_dict())
    model = extend(model, use_converter=True)
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    X, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    ggn = vivitlib.LowRankGGN(
        model.parameters(),
        compute=("eigenvalues", "directional_derivatives", "eigenvectors"),
    )
    with backpack(*ggn.extensions, extension_hook=ggn.hook):
        loss_fn(model(X), y).backward()
    block = ggn.blocks[0]
    assert block.num_directions == 2 * 9  # cross-entropy: C - 1 per sample
    torch.testing.assert_close(block.lambda_means, block.evals, rtol=1e-6, atol=0)
    E = torch.cat([e.flatten(1) for e in block.evecs(3)], 1).double()
    torch.testing.assert_close(
        E @ E.T, torch.eye(3, dtype=torch.float64), atol=1e-4, rtol=0
    )
    # .grad equals a plain backward of the unconverted network
    torch.nn.CrossEntropyLoss()(reference(X), y).backward()
    total = sum(p.grad.pow(2).sum() for p in model.parameters())
    expected = sum(p.grad.pow(2).sum() for p in reference.parameters())
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=0)
    # mean directional gradient equals e_kᵀ ∇L
    g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    torch.testing.assert_close(block.gamma_means[:3], E @ g, rtol=1e-3, atol=1e-6)
