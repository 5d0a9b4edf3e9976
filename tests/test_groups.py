"""Group-size helpers: they must follow the column order jac_to_grad uses."""

from __future__ import annotations

import torch
from torch import nn
from torchjd.autojac import backward, jac_to_grad
from torchjd.aggregation import Sum

from fusedjd import groups


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))  # a non-leaf module with its own parameter
        self.lin = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)

    def forward(self, x):
        return self.norm(self.lin(x * self.scale))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), _Block(), nn.Linear(2, 5, bias=False))


def test_sizes():
    model = _model()
    params = list(model.parameters())
    assert groups.whole_model(params) == [sum(p.numel() for p in params)]
    assert groups.all_matrix(params) == [p.numel() for p in params]
    assert groups.all_layer(model) == [12 + 3, 3, 6 + 2, 2 + 2, 10]
    enc, dec = model[:3], model[3:]
    assert groups.enc_dec(enc, dec) == [sum(p.numel() for p in enc.parameters()), 10]
    shared = nn.Linear(2, 2)
    assert groups.all_layer(nn.Sequential(shared, shared)) == [6]


def test_all_layer_matches_jac_to_grad_columns():
    # Each group's columns must hold exactly the parameters of one module, in jac_to_grad's order:
    # mark each parameter's column block with its module index and check the split.
    model = _model()
    x = torch.randn(5, 4)
    out = model(x).sum()
    backward([out, out * 2])
    captured = {}

    class Capture(Sum):
        def forward(self, matrix):
            captured["J"] = matrix
            return super().forward(matrix)

    jac_to_grad(model.parameters(), Capture(), retain_jac=True)
    J = captured["J"]
    sizes = groups.all_layer(model)
    assert sum(sizes) == J.shape[1]
    owners = [m for m in model.modules() if list(m.parameters(recurse=False))]
    start = 0
    for size, mod in zip(sizes, owners):
        own = torch.cat([p.jac.reshape(2, -1) for p in mod.parameters(recurse=False)], dim=1)
        assert torch.equal(J[:, start : start + size], own)
        start += size
