"""MGDA (fusedjd.MGDA, fusedjd.MGDAWeighting, ops.mgda) against torchjd 0.18's MGDA on torchjd's kinds
of inputs, its arguments and bad input, the fused route and jac_to_grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchjd import aggregation as ta
from torchjd.autojac import jac_to_grad, mtl_backward

import fusedjd
from fusedjd import ops

F64 = torch.float64


def _jacobian(name: str, m: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A Jacobian [m, n] of a named kind: random, rank-deficient (rank m // 2 + 1), conflicting (every
    pair of rows at an obtuse angle around a common mean), nearly collinear (one row plus 1e-4
    noise), with zero rows, with duplicated rows, scaled by 1e-8 and 1e8."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    n = 3 * m + 5
    if name == "rank-deficient":
        J = r(m, m // 2 + 1) @ r(m // 2 + 1, n)
    elif name == "conflicting":
        J = r(m, n) - 2.0 * r(1, n)
        J = J - J.mean(0, keepdim=True) * 1.5
    elif name == "collinear":
        J = r(1, n) + 1e-4 * r(m, n)
    elif name == "zero-rows":
        J = r(m, n)
        J[1::3] = 0.0
    elif name == "duplicated":
        J = r(m, n)
        J[m // 2:] = J[: m - m // 2].clone()
    else:
        J = r(m, n)
    return (J * {"scaled-1e-8": 1e-8, "scaled-1e8": 1e8}.get(name, 1.0)).to(dtype)


KINDS = ["random", "rank-deficient", "conflicting", "collinear", "zero-rows", "duplicated", "scaled-1e-8",
         "scaled-1e8"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 33, 64])
def test_weights_equal_torchjd(m, dtype):
    """The weights of every kind of Gramian, with the default and other epsilon / max_iters, equal
    torchjd's MGDAWeighting's within 1e-12 in float64. fusedjd iterates in float64 whatever the
    dtype, torchjd in the Gramian's: for a float32 Gramian fusedjd's weights equal torchjd's
    iteration in float64 on the same Gramian within float32's rounding of the result (1.2e-7), so
    they differ from torchjd's float32 iteration by at most that iteration's own rounding error
    plus 1.2e-7 (its distance to the float64 one: up to 1.1e-6 with the defaults, 1e-2 after 1000
    iterations with epsilon = 1e-6, where it stops elsewhere)."""
    for seed, name in enumerate(KINDS):
        J = _jacobian(name, m, seed, dtype)
        G = J @ J.T
        for eps, iters in ((0.001, 100), (1e-6, 1000), (0.5, 1), (0.01, 3)):
            ours, theirs = fusedjd.MGDAWeighting(eps, iters)(G), ta.MGDAWeighting(eps, iters)(G)
            assert ours.dtype == dtype and ours.shape == (m,)
            if dtype == F64:
                assert _rel(ours, theirs) <= 1e-12, (name, eps, iters, _rel(ours, theirs))
            else:
                exact = ta.MGDAWeighting(eps, iters)(G.double())
                scale = float(exact.abs().max())
                dist = lambda a, b: float((a.double() - b.double()).abs().max()) / scale  # noqa: E731
                assert dist(ours, exact) <= 1.2e-7, (name, eps, iters, dist(ours, exact))


def test_aggregator_equals_torchjd_and_takes_the_fused_route():
    """fusedjd.MGDA()(J) equals torchjd's MGDA()(J), with torchjd's arguments and repr."""
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-6)):
        J = _jacobian("conflicting", 8, 0, dtype)
        ours, theirs = fusedjd.MGDA(epsilon=0.01, max_iters=50), ta.MGDA(epsilon=0.01, max_iters=50)
        assert _rel(ours(J), theirs(J)) <= tol
    assert repr(fusedjd.MGDA()) == repr(ta.MGDA()) == "MGDA(epsilon=0.001, max_iters=100)"
    assert isinstance(fusedjd.MGDA(), ta.MGDA) and isinstance(fusedjd.MGDAWeighting(), ta.MGDAWeighting)
    agg = fusedjd.MGDA()
    agg.epsilon, agg.max_iters = 0.1, 7
    assert agg.gramian_weighting.epsilon == 0.1 and agg.gramian_weighting.max_iters == 7


def test_jac_to_grad_equals_torchjd():
    """fusedjd.jac_to_grad with fusedjd.MGDA gives torchjd's jac_to_grad with torchjd's MGDA, and
    returns the weights."""
    torch.manual_seed(0)
    shared, heads = nn.Linear(6, 5).double(), [nn.Linear(5, 1).double() for _ in range(3)]
    x = torch.randn(16, 6, dtype=F64)
    grads = []
    for agg, fn in ((ta.MGDA(), jac_to_grad), (fusedjd.MGDA(), fusedjd.jac_to_grad)):
        for p in shared.parameters():
            p.grad = None
        feat = shared(x)
        losses = [h(feat).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]
        mtl_backward(losses, features=feat)
        fn(shared.parameters(), agg)
        grads.append([p.grad.clone() for p in shared.parameters()])
    for a, b in zip(*grads):
        assert _rel(b, a) <= 1e-12


def test_bad_input():
    """Argument errors name the argument and the value; a non-square or integer Gramian is refused
    by name; a non-finite Gramian gives NaN weights."""
    for bad, err in ((0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("a", TypeError)):
        with pytest.raises(err, match="`epsilon`"):
            fusedjd.MGDAWeighting(epsilon=bad)
        with pytest.raises(err, match="`epsilon`"):
            fusedjd.MGDA(epsilon=bad)
    for bad, err in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match=r"`max_iters`.*" + repr(bad).replace(".", r"\.")):
            fusedjd.MGDAWeighting(max_iters=bad)
    w = fusedjd.MGDAWeighting()
    with pytest.raises(ValueError, match="gramian"):
        w(torch.zeros(3, 2))
    with pytest.raises((TypeError, ValueError, RuntimeError), match="gramian|`G`"):
        w(torch.eye(3, dtype=torch.long))
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises((TypeError, ValueError, RuntimeError), match="float8|Float8"):
            w(torch.eye(3).to(torch.float8_e4m3fn))
    G = torch.eye(3)
    G[0, 1] = float("nan")
    assert torch.isnan(w(G)).all()
    G[0, 1] = float("inf")
    assert torch.isnan(w(G)).all()
    assert w(torch.zeros(0, 0)).shape == (0,)


def test_weights_do_not_require_grad_and_half_precision_runs():
    G = _jacobian("random", 5, 0, F64)
    G = (G @ G.T).requires_grad_()
    assert not fusedjd.MGDAWeighting()(G).requires_grad
    for dt in (torch.float16, torch.bfloat16):
        w = fusedjd.MGDAWeighting()(G.detach().to(dt))
        assert w.dtype == dt and _rel(w, ops.mgda(G.detach())) < 1e-2
