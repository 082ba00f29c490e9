"""End to end: Lamb trains a small network on a generated task."""

from __future__ import annotations

import pytest
import torch

from torchlamb import Lamb, param_groups


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
def test_lamb_learns_a_generated_classification_task(foreach):
    torch.manual_seed(0)
    # Four Gaussian blobs in 10-D; a two-layer MLP must separate them.
    centers = 3 * torch.randn(4, 10)
    labels = torch.randint(0, 4, (2048,))
    inputs = centers[labels] + torch.randn(2048, 10)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4))
    optimizer = Lamb(param_groups(model, weight_decay=0.01), lr=0.02, foreach=foreach)
    loss_fn = torch.nn.CrossEntropyLoss()
    initial = loss_fn(model(inputs), labels).item()
    for _ in range(60):  # full batch: the large-batch regime LAMB is for
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        optimizer.step()
    final = loss_fn(model(inputs), labels).item()
    accuracy = (model(inputs).argmax(1) == labels).float().mean().item()
    assert initial > 1.0 and final < 0.1, (initial, final)
    assert accuracy > 0.97
