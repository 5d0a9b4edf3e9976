"""A short real multi-task training loop (mtl_backward + jac_to_grad): fusedjd's aggregators take
the trajectory of their references under the same seed (torchjd's GradVac and PCGrad, torchjd's
grouping recipe for GroupedGradVac, a MoCo on fusedjd.reference), and the losses go down."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torchjd import aggregation as ta
from torchjd.aggregation import Aggregator
from torchjd.autojac import jac_to_grad, mtl_backward

import fusedjd
from fusedjd import reference


class _TorchjdGroupedGradVac(Aggregator):
    """torchjd's grouping recipe: one torchjd GradVac per column group, called in group order."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes
        self.aggs = nn.ModuleList([ta.GradVac() for _ in sizes])

    def forward(self, matrix: Tensor, /) -> Tensor:
        return torch.cat([agg(part) for agg, part in zip(self.aggs, matrix.split(self.sizes, dim=1), strict=True)])


class _ReferenceMoCo(Aggregator):
    """MoCo on fusedjd.reference.moco_step (float64, plain PyTorch), its state kept here."""

    def __init__(self, **hyper) -> None:
        super().__init__()
        self.hyper, self.y, self.lam, self.step = hyper, None, None, 0

    def forward(self, matrix: Tensor, /) -> Tensor:
        J = matrix.double()
        if self.y is None:
            self.y = torch.zeros_like(J)
            self.lam = torch.full((J.shape[0],), 1.0 / J.shape[0], dtype=torch.float64)
        self.lam, out, self.y, self.step = reference.moco_step(J, self.y, self.lam, self.step, **self.hyper)
        return out.to(matrix.dtype)


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
    return torch.stack(history)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda enc: fusedjd.GradVac(), lambda enc: ta.GradVac()),
        (lambda enc: fusedjd.PCGrad(), lambda enc: ta.PCGrad()),
        (lambda enc: fusedjd.GroupedGradVac(fusedjd.groups.all_layer(enc)),
         lambda enc: _TorchjdGroupedGradVac(fusedjd.groups.all_layer(enc))),
        (lambda enc: fusedjd.MoCo(), lambda enc: _ReferenceMoCo()),
        (lambda enc: fusedjd.MoCo(simplex="projection", rho=0.01),
         lambda enc: _ReferenceMoCo(projection=True, rho=0.01)),
    ],
    ids=["GradVac", "PCGrad", "GroupedGradVac-all_layer", "MoCo", "MoCo-projection"],
)
def test_training_follows_the_reference_trajectory(ours, theirs):
    """The 60-step loss trajectory is the reference's (float32 rounding apart), and it goes down."""
    got, expected = _train(ours), _train(theirs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert (got[-1] < 0.7 * got[0]).all(), (got[0], got[-1])
