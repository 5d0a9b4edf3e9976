"""A short real multi-task training loop (mtl_backward + jac_to_grad) lowers the losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchjd.autojac import jac_to_grad, mtl_backward

import fusedjd


def _train(make_agg, steps=60):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(3)])
    W = torch.randn(3, 8)
    x = torch.randn(256, 8)
    ys = [torch.tanh(x @ W[t]) + 0.1 * torch.randn(256) for t in range(3)]
    agg = make_agg(encoder)
    opt = torch.optim.SGD([*encoder.parameters(), *heads.parameters()], lr=0.05)
    history = []
    for _ in range(steps):
        f = encoder(x)
        losses = [((h(f).squeeze(-1) - y) ** 2).mean() for h, y in zip(heads, ys)]
        opt.zero_grad()
        mtl_backward(losses, features=f)
        jac_to_grad(encoder.parameters(), agg)
        opt.step()
        history.append(torch.stack(losses).detach())
    return history[0], history[-1]


@pytest.mark.parametrize(
    "make_agg",
    [
        lambda enc: fusedjd.MoCo(),
        lambda enc: fusedjd.MoCo(simplex="projection", rho=0.01),
        lambda enc: fusedjd.GroupedGradVac(fusedjd.groups.all_layer(enc)),
        lambda enc: fusedjd.GradVac(),
        lambda enc: fusedjd.PCGrad(),
    ],
    ids=["MoCo", "MoCo-projection", "GroupedGradVac-all_layer", "GradVac", "PCGrad"],
)
def test_training_lowers_every_loss(make_agg):
    first, last = _train(make_agg)
    assert torch.isfinite(last).all()
    assert (last < 0.7 * first).all(), (first, last)
