"""GradVac / PCGrad / GroupedGradVac: drop-in parity with torchjd 0.18 and the class contract."""

from __future__ import annotations

import re

import pytest
import torch
import torchjd
from torch import nn
from torchjd import aggregation as ta
from torchjd.autogram import Engine
from torchjd.autojac import jac_to_grad, mtl_backward

import fusedjd

from fusedjd import ops, reference
from fusedjd.reference import rel_err

from conftest import DEVICES

PAIRS = [
    (fusedjd.GradVac, ta.GradVac, "matrix"),
    (fusedjd.GradVacWeighting, ta.GradVacWeighting, "gramian"),
    (fusedjd.PCGrad, ta.PCGrad, "matrix"),
    (fusedjd.PCGradWeighting, ta.PCGradWeighting, "gramian"),
]


def _inputs(m, n, dtype, calls, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    Js = [torch.randn(m, n, generator=gen, dtype=dtype) for _ in range(calls)]
    return Js if kind == "matrix" else [J @ J.T for J in Js]


def _run(agg, xs, seed, device="cpu"):
    torch.manual_seed(seed)
    return [agg(x.to(device)).cpu() for x in xs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ours,theirs,kind", PAIRS, ids=[p[0].__name__ for p in PAIRS])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_torchjd_over_20_calls(device, ours, theirs, kind, m, dtype):
    xs = _inputs(m, 3 * m + 11, dtype, 20, seed=m, kind=kind)
    got = _run(ours(), xs, seed=123, device=device)
    expected = _run(theirs(), xs, seed=123)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for call, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert rel_err(g, e) < tol, f"call {call}"
    # same number of draws from the global generator as torchjd
    torch.manual_seed(0)
    ours()(xs[0].to(device))
    after_ours = torch.rand(1)
    torch.manual_seed(0)
    theirs()(xs[0])
    assert torch.equal(after_ours, torch.rand(1))


@pytest.mark.parametrize("beta,eps", [(0.0, 1e-8), (1.0, 0.0), (0.2, 1e-3)])
def test_parity_hyperparameters(beta, eps):
    xs = _inputs(6, 40, torch.float64, 10, seed=9, kind="matrix")
    if eps > 0:
        xs[3][2] = 0.0  # a zero row
    got = _run(fusedjd.GradVac(beta, eps), xs, seed=5)
    expected = _run(ta.GradVac(beta, eps), xs, seed=5)
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-10


def test_zero_row_with_eps_zero_does_not_poison_targets():
    # torchjd computes the cosine with a zero row as 0/0 = NaN when eps = 0 and keeps NaN
    # targets from then on; fusedjd takes that cosine as 0 (documented) and stays finite.
    xs = _inputs(4, 30, torch.float64, 6, seed=2, kind="matrix")
    xs[1][2] = 0.0
    ours, theirs = fusedjd.GradVac(eps=0.0), ta.GradVac(eps=0.0)
    got, expected = _run(ours, xs, seed=3), _run(theirs, xs, seed=3)
    assert rel_err(got[0], expected[0]) < 1e-10  # before the zero row: identical
    assert torch.isfinite(ours.gramian_weighting._targets).all()
    assert all(torch.isfinite(g).all() for g in got)
    assert torch.isnan(theirs.gramian_weighting._phi_t).any()


def _recipe(sizes, Js, seed):
    """torchjd's grouping recipe: one torchjd GradVac per group, called in group order."""
    aggs = [ta.GradVac() for _ in sizes]
    torch.manual_seed(seed)
    outs = []
    for J in Js:
        blocks = torch.split(J, sizes, dim=1)
        outs.append(torch.cat([a(b) for a, b in zip(aggs, blocks)]))
    return outs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [[7], [3, 0, 9, 4], [2] * 12, [50, 20, 30]])
def test_grouped_equals_torchjd_recipe(device, sizes):
    n = sum(sizes)
    gen = torch.Generator().manual_seed(n)
    # Groups narrower than m hold nearly collinear rows, whose weights amplify rounding:
    # compare those in float64.
    dtype = torch.float64 if min(s for s in sizes if s > 0) < 5 else torch.float32
    Js = [torch.randn(5, n, generator=gen, dtype=dtype) for _ in range(20)]
    got = _run(fusedjd.GroupedGradVac(sizes), Js, seed=77, device=device)
    for g, e in zip(got, _recipe(sizes, Js, seed=77)):
        assert rel_err(g, e) < (1e-9 if dtype == torch.float64 else 1e-4)


def _collinear(m, scale, same_sign, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 1001, generator=gen, dtype=torch.float64)
    coef = torch.rand(m, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    if not same_sign:
        coef[::2] *= -1
    return (coef * v * scale).float()


@pytest.mark.parametrize("scale", [1e5, 1e15])
def test_collinear_rows_stay_finite_where_torchjd_overflows(scale):
    torchjd_blew_up = False
    for seed, m in enumerate([2, 3, 4, 5, 8]):
        J = _collinear(m, scale, same_sign=False, seed=seed)
        ours, theirs = fusedjd.GradVac(), ta.GradVac()
        bound = J.double().abs().sum(0).norm()
        for call in range(50):
            torch.manual_seed(call)
            out = ours(J)
            torch.manual_seed(call)
            torchjd_blew_up |= not bool(torch.isfinite(theirs(J)).all())
            assert torch.isfinite(out).all(), (seed, call)
            assert out.double().norm() <= 1.01 * bound
    assert torchjd_blew_up  # the case is real: torchjd 0.18 overflows on some of these


@pytest.mark.parametrize("scale", [1.0, 1e5, 1e15])
def test_matches_torchjd_where_it_does_not_blow_up(scale):
    # same-sign collinear rows: targets saturate at 1, torchjd stays finite, results agree
    for seed, m in enumerate([2, 4, 8]):
        J = _collinear(m, scale, same_sign=True, seed=seed)
        got = _run(fusedjd.GradVac(), [J] * 40, seed=1)
        expected = _run(ta.GradVac(), [J] * 40, seed=1)
        for g, e in zip(got, expected):
            assert torch.isfinite(e).all()
            assert rel_err(g, e) < 1e-5
    # generic rows at large scale
    gen = torch.Generator().manual_seed(3)
    Js = [torch.randn(6, 200, generator=gen) * scale for _ in range(20)]
    for g, e in zip(_run(fusedjd.GradVac(), Js, seed=2), _run(ta.GradVac(), Js, seed=2)):
        assert rel_err(g, e) < 1e-4


def test_real_subclasses_of_torchjd_bases():
    assert isinstance(fusedjd.GradVac(), ta.GramianWeightedAggregator)
    assert isinstance(fusedjd.PCGrad(), ta.GramianWeightedAggregator)
    assert isinstance(fusedjd.GroupedGradVac([3]), ta.Aggregator)
    for w in [fusedjd.GradVacWeighting(), fusedjd.PCGradWeighting()]:
        assert isinstance(w, ta.Weighting)
    for s in [fusedjd.GradVac(), fusedjd.GradVacWeighting(), fusedjd.GroupedGradVac([3])]:
        assert isinstance(s, torchjd.Stateful)
    assert not isinstance(fusedjd.PCGrad(), torchjd.Stateful)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])

    def losses(self, x, ys):
        f = self.encoder(x)
        return f, [((h(f).squeeze(-1) - y) ** 2).mean() for h, y in zip(self.heads, ys)]


def _backward(net, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 10, generator=gen)
    ys = [torch.randn(32, generator=gen) for _ in range(3)]
    f, losses = net.losses(x, ys)
    mtl_backward(losses, features=f)


@pytest.mark.parametrize("optimize", [False, True])
def test_jac_to_grad_returns_weights_like_torchjd(optimize):
    torch.manual_seed(0)
    net = _Net()
    results = []
    for agg in [fusedjd.GradVac(), ta.GradVac()]:
        grads, weights = [], []
        for step in range(5):
            for p in net.parameters():
                p.grad = None
            _backward(net, seed=step)
            torch.manual_seed(100 + step)
            w = jac_to_grad(net.encoder.parameters(), agg, optimize_gramian_computation=optimize)
            weights.append(w)
            grads.append(torch.cat([p.grad.flatten() for p in net.encoder.parameters()]))
        results.append((weights, grads))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert a is not None and rel_err(a, b) < 1e-4


def test_grouped_all_layer_equals_recipe_through_jac_to_grad():
    torch.manual_seed(0)
    net = _Net()
    enc = list(net.encoder.parameters())
    sizes = fusedjd.groups.all_layer(net.encoder)
    layers = [m for m in net.encoder.modules() if list(m.parameters(recurse=False))]
    ours, theirs = fusedjd.GroupedGradVac(sizes), [ta.GradVac() for _ in layers]
    for step in range(5):
        _backward(net, seed=step)
        torch.manual_seed(step)
        jac_to_grad(enc, ours)
        got = torch.cat([p.grad.flatten() for p in enc])
        for p in net.parameters():
            p.grad = None
        _backward(net, seed=step)
        torch.manual_seed(step)
        for layer, agg in zip(layers, theirs):
            jac_to_grad(layer.parameters(), agg)
        expected = torch.cat([p.grad.flatten() for p in enc])
        for p in net.parameters():
            p.grad = None
        assert rel_err(got, expected) < 1e-4


def test_weighting_works_with_autogram_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1))
    x, y = torch.randn(12, 5), torch.randn(12)
    results = []
    for weighting in [fusedjd.GradVacWeighting(), ta.GradVacWeighting()]:
        engine = Engine(model, batch_dim=0)
        losses = (model(x).squeeze(-1) - y) ** 2
        G = engine.compute_gramian(losses)
        torch.manual_seed(4)
        w = weighting(G)
        losses.backward(w)
        results.append((w, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    assert rel_err(results[0][0], results[1][0]) < 1e-4
    for a, b in zip(results[0][1], results[1][1]):
        assert rel_err(a, b) < 1e-4


def test_repr_str_and_validated_properties():
    assert repr(fusedjd.GradVac()) == repr(ta.GradVac()) == "GradVac(beta=0.5, eps=1e-08)"
    assert str(fusedjd.GradVac()) == str(ta.GradVac()) == "GradVac"
    assert repr(fusedjd.PCGrad()) == repr(ta.PCGrad()) and str(fusedjd.PCGrad()) == "PCGrad"
    assert repr(fusedjd.GroupedGradVac([2, 3], beta=0.1)) == "GroupedGradVac(group_sizes=[2, 3], beta=0.1, eps=1e-08)"
    for cls in [fusedjd.GradVac, fusedjd.GradVacWeighting, lambda **kw: fusedjd.GroupedGradVac([2], **kw)]:
        with pytest.raises(ValueError, match=r"Attribute `beta` must be in \[0, 1\]. Found beta=1.5."):
            cls(beta=1.5)
        with pytest.raises(ValueError, match=r"Attribute `eps` must be non-negative. Found eps=-1.0."):
            cls(eps=-1.0)
        with pytest.raises(TypeError, match=r"Attribute `beta` must be a real number. Found beta='0.5'."):
            cls(beta="0.5")
        with pytest.raises(TypeError, match=r"Attribute `eps` must be a real number. Found eps=None."):
            cls(eps=None)
        agg = cls()
        with pytest.raises(ValueError, match="beta"):
            agg.beta = -0.1
        agg.beta = 0.25
        assert agg.beta == 0.25
    for bad in [[], [3, -1], [2.5], "ab", [None]]:
        with pytest.raises(ValueError, match="Attribute `group_sizes` must be a non-empty sequence"):
            fusedjd.GroupedGradVac(bad)


def test_outputs_do_not_require_grad():
    J = torch.randn(3, 8, requires_grad=True)
    for agg in [fusedjd.GradVac(), fusedjd.PCGrad(), fusedjd.GroupedGradVac([4, 4])]:
        assert not agg(J).requires_grad
    G = (J @ J.T).detach().requires_grad_()
    assert not fusedjd.GradVacWeighting()(G).requires_grad


@pytest.mark.parametrize("make", [fusedjd.GradVac, lambda: fusedjd.GroupedGradVac([5, 0, 7])])
def test_state_dict_round_trip_continues_exactly(make):
    gen = torch.Generator().manual_seed(1)
    Js = [torch.randn(4, 12, generator=gen) for _ in range(8)]
    a = make()
    torch.manual_seed(0)
    for J in Js[:4]:
        a(J)
    b = make()
    b.load_state_dict(a.state_dict())
    assert any(k.endswith("_targets") for k in a.state_dict())
    rng = torch.get_rng_state()
    outs_a = [a(J) for J in Js[4:]]
    torch.set_rng_state(rng)
    outs_b = [b(J) for J in Js[4:]]
    for x, y in zip(outs_a, outs_b):
        assert torch.equal(x, y)


def _targets(agg):
    return agg.gramian_weighting._targets


def test_state_resets_on_change_of_m_and_dtype_not_of_n():
    agg = fusedjd.GradVac()
    J = torch.randn(3, 10)
    torch.manual_seed(0)
    agg(J)
    agg(J)
    for changed in [torch.randn(4, 10), torch.randn(3, 10, dtype=torch.float64)]:
        fresh = fusedjd.GradVac()
        torch.manual_seed(1)
        expected = fresh(changed)
        torch.manual_seed(1)
        assert torch.equal(agg(changed), expected)
        torch.manual_seed(0)
        agg(J)
    # a new n keeps the targets, as torchjd's GradVac does (its state is keyed by m and the dtype)
    Js = [torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64),
          torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)]
    for g, e in zip(_run(fusedjd.GradVac(), Js, seed=3), _run(ta.GradVac(), Js, seed=3)):
        assert rel_err(g, e) < 1e-12


def test_compiled_gradvac_takes_a_new_n_without_recompiling():
    """n is symbolic in the ops' schemas (SymInt[] group sizes) and GradVac keeps no n: after
    torch.compile's first recompile (which marks n dynamic) no new n recompiles, where each new n
    used to recompile until the limit and then fail under fullgraph=True."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = fusedjd.GradVac(), fusedjd.GradVac()
    fn = torch.compile(compiled, fullgraph=True)
    for n in range(100, 116):
        J = torch.randn(4, n, dtype=torch.float64)
        torch.manual_seed(n)
        expected = eager(J)
        torch.manual_seed(n)
        assert rel_err(fn(J), expected) < 1e-12, n
    # (read from a Counter, a renamed statistic would read 0: it must be there, and count the graphs)
    assert "unique_graphs" in counters["stats"], dict(counters["stats"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


def test_reset_clears_state():
    agg = fusedjd.GradVac()
    J = torch.randn(3, 10)
    torch.manual_seed(0)
    first = agg(J)
    agg(J)
    agg.reset()
    torch.manual_seed(0)
    assert torch.equal(agg(J), first)


@pytest.mark.parametrize("make,kind", [(fusedjd.GradVac, "matrix"), (lambda: fusedjd.GroupedGradVac([6, 4]), "matrix"),
                                       (fusedjd.GradVacWeighting, "gramian")])
def test_nonfinite_input_keeps_state_and_returns_nonfinite(make, kind):
    agg = make()
    J = torch.randn(3, 10)
    torch.manual_seed(0)
    agg(J if kind == "matrix" else J @ J.T)
    state = {k: v.clone() for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}
    for bad in [float("nan"), float("inf")]:
        Jb = J.clone()
        Jb[1, 7] = bad
        out = agg(Jb if kind == "matrix" else Jb @ Jb.T)
        assert not torch.isfinite(out).all()
        for k, v in agg.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, state[k]), k


def test_empty_inputs_like_torchjd():
    for ours, theirs in [(fusedjd.GradVac(), ta.GradVac()), (fusedjd.PCGrad(), ta.PCGrad())]:
        for shape in [(0, 5), (3, 0), (0, 0)]:
            J = torch.zeros(shape)
            torch.manual_seed(0)
            g = ours(J)
            torch.manual_seed(0)
            e = theirs(J)
            assert g.shape == e.shape and torch.equal(g, e)
    assert torch.equal(fusedjd.GroupedGradVac([5])(torch.zeros(0, 5)), torch.zeros(5))
    assert fusedjd.GradVacWeighting()(torch.zeros(0, 0)).shape == (0,)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"Parameter `matrix` should be a tensor of dimension 2"):
        fusedjd.GradVac()(torch.randn(3))
    with pytest.raises(TypeError, match=r"Parameter `matrix` must be a floating-point tensor. Found dtype=torch.int64"):
        fusedjd.GradVac()(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`gramian` should be a square matrix .* Found `gramian.shape = \(2, 3\)`"):
        fusedjd.GradVacWeighting()(torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"`gramian` must be a floating-point tensor"):
        fusedjd.PCGradWeighting()(torch.ones(2, 2, dtype=torch.int32))
    agg = fusedjd.GroupedGradVac([3, 4])
    with pytest.raises(ValueError, match=r"must sum to the number of columns of `matrix` \(8\). Found sum\(group_sizes\)=7"):
        agg(torch.randn(2, 8))
    before = agg.state_dict()
    assert all(v.numel() == 0 for v in before.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(4, 300, generator=gen)
    torch.manual_seed(0)
    ours = fusedjd.GradVac()(J.to(dtype))
    torch.manual_seed(0)
    ref = ta.GradVac()(J.to(dtype).double()).to(dtype)
    assert ours.dtype == dtype and rel_err(ours, ref) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ours,theirs", [(fusedjd.GradVac, ta.GradVac), (fusedjd.GradVacWeighting, ta.GradVacWeighting)])
def test_torchjd_checkpoint_continues_as_torchjd_would(dtype, ours, theirs):
    """A torchjd 0.18 state_dict (its `_phi_t` targets) loads into fusedjd's class (strict), and the
    next calls give what the torchjd instance that wrote it gives, under the same seed."""
    gen = torch.Generator().manual_seed(3)
    Js = [torch.randn(5, 40, generator=gen, dtype=dtype) for _ in range(6)]
    arg = (lambda J: J) if ours is fusedjd.GradVac else (lambda J: J @ J.T)
    tj = theirs(beta=0.3)
    torch.manual_seed(0)
    for J in Js[:3]:
        tj(arg(J))
    sd = tj.state_dict()
    assert any(k.endswith("_phi_t") for k in sd)
    fj = ours(beta=0.3)
    fj.load_state_dict(sd)
    seed = torch.seed()
    for J in Js[3:]:
        torch.manual_seed(seed)
        expected = tj(arg(J))
        torch.manual_seed(seed)
        got = fj(arg(J))
        assert rel_err(got, expected) < (1e-12 if dtype == torch.float64 else 1e-5)
        seed += 1
    # and fusedjd's own state_dict, written into torchjd as documented on fusedjd.GradVac
    key = "gramian_weighting._targets" if ours is fusedjd.GradVac else "_targets"
    targets = fj.state_dict()[key][0]
    back = theirs(beta=0.3)
    w = back.gramian_weighting if ours is fusedjd.GradVac else back
    w._phi_t = targets.clone()
    w._state_key = (targets.shape[0], targets.dtype)
    torch.manual_seed(9)
    expected = back(arg(Js[0]))
    torch.manual_seed(9)
    assert rel_err(fj(arg(Js[0])), expected) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("make", [fusedjd.GradVac, fusedjd.PCGrad])
def test_hooks_on_the_weighting_still_run(make):
    """Without hooks the aggregators call the ops directly; a hook on `.weighting` (torchjd's way
    of monitoring weights) is honoured, with the same result."""
    J = torch.randn(5, 40, dtype=torch.float64)
    torch.manual_seed(3)
    plain = make()(J)
    seen = []
    agg = make()
    handle = agg.weighting.register_forward_hook(lambda module, args, out: seen.append(out))
    torch.manual_seed(3)
    hooked = agg(J)
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (5,)
    assert torch.equal(plain, hooked)
    torch.testing.assert_close(seen[0] @ J, hooked)


def test_device_draws_option():
    """draws="device": validated, shown in repr (the default repr stays torchjd's), the same
    aggregation with orders drawn on the device: the CPU generator is not consumed on CUDA, and on
    the CPU the result equals the loop run on the orders that draw gave."""
    for make in [lambda **kw: fusedjd.GradVac(**kw), lambda **kw: fusedjd.PCGrad(**kw),
                 lambda **kw: fusedjd.GroupedGradVac([3, 5], **kw), lambda **kw: fusedjd.GradVacWeighting(**kw),
                 lambda **kw: fusedjd.PCGradWeighting(**kw)]:
        with pytest.raises(ValueError, match=r"Attribute `draws` must be one of \('torchjd', 'device'\). "
                                             r"Found draws='gpu'."):
            make(draws="gpu")
        agg = make(draws="device")
        assert agg.draws == "device" and "draws='device'" in repr(agg)
        assert make().draws == "torchjd" and "draws" not in repr(make())
        agg.draws = "torchjd"
        assert agg.draws == "torchjd"
    assert repr(fusedjd.PCGrad(draws="device")) == "PCGrad(draws='device')"
    assert repr(fusedjd.GradVac(draws="device")) == "GradVac(beta=0.5, eps=1e-08, draws='device')"
    gen = torch.Generator().manual_seed(5)
    J = torch.randn(6, 40, generator=gen)
    for agg, pcgrad in [(fusedjd.GradVac(draws="device"), False), (fusedjd.PCGrad(draws="device"), True)]:
        torch.manual_seed(2)
        out = agg(J)
        torch.manual_seed(2)
        perms = ops.draw_perms_device(1, 6, "cpu")
        G = ops.gramian(J, [40])
        W = ops.pcgrad_loop(G, perms) if pcgrad else ops.gradvac_loop(G, perms, torch.zeros(1, 6, 6), 0.5, 1e-8)
        assert torch.equal(out, ops.combine(J, W, [40]))


def test_device_draws_are_uniform_permutations_of_the_other_rows():
    """draws="device" (ops.draw_perms_device) is documented as uniformly random visit orders: each
    row's order is a permutation of the other rows, and over 60,000 seeded draws at m = 4 each of
    the 3! orders of each row, and each row at each position, comes up equally often (Pearson's
    chi-square below its 0.999 quantile; a draw that favoured one order by 18 %, 450 more of
    15,000, fails it)."""
    import math

    m, k = 4, 15_000
    torch.manual_seed(123)
    perms = ops.draw_perms_device(k, m, "cpu")
    assert perms.shape == (k, m, m - 1) and perms.dtype == torch.long
    rows = torch.arange(m).view(1, m, 1)
    # a permutation of the other rows: every other row once, never the row itself
    assert ((perms >= 0) & (perms < m) & (perms != rows)).all()
    assert (perms.sort(dim=-1).values == torch.tensor([[j for j in range(m) if j != i] for i in range(m)])).all()

    def chi2(counts: torch.Tensor) -> float:
        expected = counts.sum() / counts.numel()
        return float(((counts - expected) ** 2 / expected).sum())

    # chi-square 0.999 quantiles: 5 degrees of freedom 20.52, 2 degrees of freedom 13.82
    for i in range(m):
        code = (perms[:, i] * torch.tensor([m * m, m, 1])).sum(-1)  # each order as one number
        orders = torch.unique(code, return_counts=True)[1].double()
        assert orders.numel() == math.factorial(m - 1), (i, orders)
        assert chi2(orders) < 20.52, (i, orders.tolist())
        for pos in range(m - 1):
            at = torch.bincount(perms[:, i, pos], minlength=m).double()
            at = torch.cat([at[:i], at[i + 1:]])
            assert chi2(at) < 13.82, (i, pos, at.tolist())
    # an 18 % preference for one order would be seen: the same statistic on a biased sample
    biased = torch.cat([torch.full((450,), 0.0), torch.arange(6).repeat(k // 6).double()])
    assert chi2(torch.unique(biased, return_counts=True)[1].double()) > 20.52
    # the generator is the device's: the same seed gives the same orders
    torch.manual_seed(123)
    assert torch.equal(ops.draw_perms_device(k, m, "cpu"), perms)


@pytest.mark.parametrize("make", [fusedjd.GradVac, lambda: fusedjd.GroupedGradVac([20, 30])])
def test_targets_keep_their_dtype_through_to(make):
    """Targets survive .to(bfloat16) / .half() (they follow only the device): the run continues
    exactly as an unmoved twin's."""
    gen = torch.Generator().manual_seed(3)
    Js = [torch.randn(4, 50, generator=gen) for _ in range(4)]
    moved, plain = make(), make()
    torch.manual_seed(0)
    for J in Js[:2]:
        moved(J)
    torch.manual_seed(0)
    for J in Js[:2]:
        plain(J)
    moved.to(torch.bfloat16).half()
    assert moved.gramian_weighting._targets.dtype == torch.float32
    rng = torch.get_rng_state()
    got = [moved(J) for J in Js[2:]]
    torch.set_rng_state(rng)
    assert all(torch.equal(a, plain(J)) for a, J in zip(got, Js[2:]))


@pytest.mark.parametrize("make", [fusedjd.GradVac, fusedjd.PCGrad, lambda: fusedjd.GroupedGradVac([10, 20])])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_unsupported_dtypes_are_refused_before_the_state_is_touched(make, dtype):
    """float8 (and any dtype the kernels do not take) is refused by name, before the targets move,
    through the aggregator and through jac_to_grad (whose .jac fields stay)."""
    gen = torch.Generator().manual_seed(5)
    agg = make()
    agg(torch.randn(4, 30, generator=gen))
    state = {k: v.clone() for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}
    message = rf"must have dtype float16, bfloat16, float32 or float64\. Found dtype={re.escape(str(dtype))}\."
    with pytest.raises(TypeError, match=r"Parameter `matrix` " + message):
        agg(torch.randn(5, 31, generator=gen).to(dtype))
    p = torch.zeros(30, requires_grad=True)
    p.jac = torch.randn(4, 30, generator=gen).to(dtype)
    with pytest.raises(TypeError, match=r"Parameter `tensors.jac` " + message):
        fusedjd.jac_to_grad([p], agg)
    assert hasattr(p, "jac") and p.grad is None
    after = {k: v for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(v, after[k]) for k, v in state.items())


@pytest.mark.parametrize("bad", [float("nan"), 5.0, -1.5, float("inf")])
def test_checkpoints_with_impossible_targets_are_refused(bad):
    """Targets are moving averages of cosines: a checkpoint whose targets are not finite or leave
    [-1, 1] is refused, naming the key, and nothing is loaded."""
    src, dst = fusedjd.GradVac(), fusedjd.GradVac()
    src(torch.randn(4, 30)), dst(torch.randn(4, 20))
    sd = src.state_dict()
    sd["gramian_weighting._targets"][0, 1, 2] = bad
    kept = dst.gramian_weighting._targets.clone()
    with pytest.raises(RuntimeError, match=r"`gramian_weighting\._targets` must hold finite targets in \[-1, 1\]"):
        dst.load_state_dict(sd)
    assert torch.equal(dst.gramian_weighting._targets, kept)
    theirs = ta.GradVac().state_dict()  # a torchjd checkpoint, its targets in _phi_t
    theirs["gramian_weighting._phi_t"] = torch.full((4, 4), bad)
    with pytest.raises(RuntimeError, match=r"`gramian_weighting\._phi_t` must hold finite targets"):
        fusedjd.GradVac().load_state_dict(theirs)


def test_hyper_parameters_that_cannot_be_right_are_refused():
    with pytest.raises(ValueError, match=r"^Attribute `eps` must be finite\. Found eps=inf\.$"):
        fusedjd.GradVac(eps=float("inf"))
    for name in ["gamma", "rho", "beta_sigma", "gamma_sigma"]:
        with pytest.raises(ValueError, match=rf"^Attribute `{name}` must be finite\. Found {name}=inf\.$"):
            fusedjd.MoCo(**{name: float("inf")})
    with pytest.raises(TypeError, match=r"Attribute `beta` must be a real number with a value\. Found beta=.*meta"):
        fusedjd.MoCo(beta=torch.tensor(0.5, device="meta"))
    beta = torch.tensor(0.5)
    agg = fusedjd.MoCo(beta=beta)
    beta.fill_(5.0)  # the caller's tensor, changed in place later: the aggregator kept its own copy
    assert float(agg.beta) == 0.5
    for bad in ["34", b"34"]:
        with pytest.raises(ValueError, match="Attribute `group_sizes` must be a non-empty sequence"):
            fusedjd.GroupedGradVac(bad)


def test_ops_refuse_aliased_targets_and_overflowing_group_sizes():
    """Targets and Y, updated in place, may not share the memory of G or J (the kernels refuse it;
    a traced call works on functional copies); group sizes whose sum leaves int64 are refused, not
    wrapped around, by the kernels and the fake kernel alike."""
    for device in ("cpu",):
        G = torch.eye(3).unsqueeze(0).to(device)
        perms = ops.draw_perms(1, 3, pcgrad=False).to(device)
        with pytest.raises(RuntimeError, match=r"`targets` \(updated in place\) must not share memory with `G`"):
            ops.gradvac_loop(G, perms, G, 0.5, 1e-8)
        Y = torch.zeros(3, 8, device=device)
        with pytest.raises(RuntimeError, match=r"`Y` \(updated in place\) must not share memory with `J\[1\]`"):
            ops.moco_step([torch.zeros(3, 4, device=device), Y[:, 4:]], Y, torch.ones(3, device=device),
                          torch.zeros((), dtype=torch.long, device=device), 0.5, 0.5, 0.1, 0.5, 0.0, False)
    J = torch.randn(2, 7)
    sizes = [2**62, 2**62, 2**62, 2**62 + 7]
    message = r"`group_sizes` must sum to the number of columns n=7, got a sum beyond the int64 range for 4 groups"
    with pytest.raises(RuntimeError, match=message):
        ops.gramian(J, sizes)
    with pytest.raises(RuntimeError, match=message):
        ops.gramian(J.to("meta"), sizes)


def test_phi_t_reads_the_targets_as_torchjd_names_them():
    """torchjd's own tests read GradVacWeighting._phi_t: None before a call and after a reset, the
    [m, m] targets otherwise (read-only: the state lives in _targets)."""
    agg = fusedjd.GradVac()
    assert agg.gramian_weighting._phi_t is None
    agg(torch.randn(3, 10))
    assert torch.equal(agg.gramian_weighting._phi_t, agg.gramian_weighting._targets[0])
    agg.reset()
    assert agg.gramian_weighting._phi_t is None
    with pytest.raises(AttributeError):
        agg.gramian_weighting._phi_t = torch.zeros(3, 3)


def test_torchjd_targets_a_rounding_beyond_one_load_clamped():
    """torchjd does not clamp its cosines: its float32 targets can sit an ulp above 1 (identical
    rows). Such a checkpoint loads, its targets clamped to [-1, 1]."""
    tj = ta.GradVac()
    tj(torch.randn(3, 10))
    above = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
    theirs = {k: (torch.full((3, 3), above) if k.endswith("_phi_t") else v) for k, v in tj.state_dict().items()}
    ours = fusedjd.GradVac()
    ours.load_state_dict(theirs)
    assert torch.equal(ours.gramian_weighting._targets, torch.ones(1, 3, 3))


def _low_rank(rank: int, m: int, seed: int) -> torch.Tensor:
    """The issue's construction: a rank-``rank`` float64 J, rows scaled over two decades."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, 1000, generator=gen, dtype=torch.float64)
    return J * torch.logspace(-1, 1, m, dtype=torch.float64).unsqueeze(1)


def _calls(make, J, seed, beta, calls=3):
    torch.manual_seed(seed)
    agg = make(beta=beta)
    return torch.stack([agg(J) for _ in range(calls)]).double()


def _reference_calls(J: torch.Tensor, seed: int, beta: float, precision: torch.dtype, calls: int = 3) -> torch.Tensor:
    """``calls`` GradVac calls by :mod:`fusedjd.reference` (float64 arithmetic, the contract's
    guards at the machine epsilon of ``precision``), on torchjd's draws under ``seed``."""
    m, n = J.shape
    torch.manual_seed(seed)
    T = torch.zeros(1, m, m, dtype=torch.float64)
    out = []
    for _ in range(calls):
        perms = ops.draw_perms(1, m, False)  # torchjd's randperm draws (test_ops checks them against torchjd's)
        G = reference.gramian(J, [n]).to(precision)
        out.append(reference.combine(J, reference.gradvac_loop(G, perms, T, beta, 1e-8), [n]))
    return torch.stack(out)


def test_float32_row_cancelled_to_rounding_does_not_saturate_a_target():
    """The guard's reproducer: row 2's corrected p cancels to rounding noise; the cosine read from a
    float32 Gramian was 1.08, the target saturated at 1, and later calls divided by the sine floor
    (3.5e6 away from the float64 result). fusedjd's float32 result is 6.0e-4 (relative) from
    torchjd's float64 one (bound 3e-3); torchjd's own float32 GradVac is 1.2e-3 away."""
    gen = torch.Generator().manual_seed(68)
    J = torch.randn(8, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    J = J * torch.logspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1)
    expected = _calls(ta.GradVac, J, 11, 1.0, calls=5)
    assert torch.isfinite(expected).all()
    assert rel_err(_reference_calls(J, 11, 1.0, torch.float64, calls=5), expected) < 1e-9  # no guard fires in float64
    ours = _calls(fusedjd.GradVac, J.float(), 11, 1.0, calls=5)
    assert rel_err(ours, expected) < 3e-3
    torch.manual_seed(11)
    agg = fusedjd.GradVac(beta=1.0)
    agg(J.float())
    assert agg.gramian_weighting._targets[0][2, 1].item() < 1.0


def test_float32_on_rank_deficient_jacobians_stays_near_the_float64_result():
    """Guard 4 (CONTRACT §1): float32 GradVac, three calls, on 96 rank-1 and rank-2 J (m = 4, 8,
    16, rows scaled over two decades), against :mod:`fusedjd.reference` on the same draws: torchjd's
    own float64 GradVac overflows or blows up on many of these (‖result‖ up to 1e47 ‖J‖), the
    reference does not, and equals it wherever it does not (47 of the 96 here).

    Errors are relative to ``max(‖expected‖, ‖J‖ √3)`` (a result of rounding noise has no relative
    precision). Measured on this project's CPU at the avx512 / avx2 / default kernels: against the
    reference at float32's precision (what the kernel computes, in exact arithmetic) median
    1e-7 / 1.5e-7 / 7.5e-7, 90 % within 5e-4 / 9e-4 / 2.1e-3, at most 2.2e-2 / 3.9e-2 / 2.2e-2;
    against the float64 result median 1.4e-7 / 2.1e-7 / 7.2e-7, 75 % within 2e-5 / 5e-5 / 2.1e-4,
    90 % within 1.5e-2 / 1.2e-2 / 1.6e-2, at most 1.6 / 1.5 / 1.5 (a cosine resolvable in float64
    and not in float32 changes a correction: chaotic, so only a loose maximum is held). The bounds
    below hold those with margins of 5× or more; a zero or NaN result fails them. On the cases
    where torchjd's float64 GradVac blows up, the only float64 answer is the reference's.
    """
    ours_vs_own, ours_vs_f64, agree = [], [], 0
    for rank in (1, 2):
        for m in (4, 8, 16):
            for seed in range(10 if m < 16 else 4):
                J = _low_rank(rank, m, 1000 * rank + 10 * m + seed)
                scale = J.norm().item() * 3**0.5
                for beta in (1.0, 0.5):
                    ours = _calls(fusedjd.GradVac, J.float(), seed, beta)
                    assert torch.isfinite(ours).all(), (rank, m, seed, beta)
                    own = _reference_calls(J.float().double(), seed, beta, torch.float32)
                    f64 = _reference_calls(J, seed, beta, torch.float64)
                    ours_vs_own.append(((ours - own).norm() / max(own.norm().item(), scale)).item())
                    ours_vs_f64.append(((ours - f64).norm() / max(f64.norm().item(), scale)).item())
                    theirs = _calls(ta.GradVac, J, seed, beta)
                    agree += bool(torch.isfinite(theirs).all()) and rel_err(f64, theirs) < 1e-9
    assert len(ours_vs_own) == 96
    assert agree >= 40, agree  # the reference is torchjd's GradVac where torchjd's does not blow up
    own, f64 = sorted(ours_vs_own), sorted(ours_vs_f64)
    assert own[48] <= 1e-5 and own[86] <= 1e-2 and own[-1] <= 0.1, (own[48], own[86], own[-5:])
    assert f64[48] <= 1e-5 and f64[72] <= 2e-3 and f64[86] <= 0.1 and f64[-1] <= 10.0, (f64[48], f64[72], f64[-5:])


def test_float64_generic_rows_are_untouched_by_the_rounding_guard():
    """In float64 on generic rows the cosine's rounding is about 1e-16: results stay torchjd's to
    1e-12 over many calls, the targets included."""
    gen = torch.Generator().manual_seed(5)
    Js = [torch.randn(7, 300, generator=gen, dtype=torch.float64) for _ in range(30)]
    ours, theirs = fusedjd.GradVac(beta=0.3), ta.GradVac(beta=0.3)
    for g, e in zip(_run(ours, Js, seed=4), _run(theirs, Js, seed=4)):
        assert rel_err(g, e) < 1e-12
    assert rel_err(ours.gramian_weighting._phi_t, theirs.gramian_weighting._phi_t) < 1e-12


def test_hooks_on_grouped_gradvac_weighting_run():
    """Hooks on GroupedGradVac.gramian_weighting run: forward calls it once with the groups'
    Gramians [k, m, m] and it returns their weights [k, m]; the result is the unhooked one."""
    J = torch.randn(4, 30, dtype=torch.float64)
    sizes = [10, 15, 5]
    torch.manual_seed(2)
    plain = fusedjd.GroupedGradVac(sizes)(J)
    seen = []
    agg = fusedjd.GroupedGradVac(sizes)
    handle = agg.gramian_weighting.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    torch.manual_seed(2)
    hooked = agg(J)
    handle.remove()
    assert len(seen) == 1
    gramians, weights = seen[0]
    assert gramians.shape == (3, 4, 4) and weights.shape == (3, 4)
    torch.testing.assert_close(gramians[1], J[:, 10:25] @ J[:, 10:25].T)
    assert torch.equal(plain, hooked)
    torch.testing.assert_close(hooked, torch.cat([w @ J[:, a:a + s] for w, a, s in zip(weights, (0, 10, 25), sizes)]))
    # the hooked call updated the same targets the fused path keeps: the runs continue alike
    fused_only = fusedjd.GroupedGradVac(sizes)
    torch.manual_seed(2)
    fused_only(J)
    torch.manual_seed(3)
    after_fused = fused_only(J)
    torch.manual_seed(3)
    assert torch.equal(agg(J), after_fused)


def test_checkpoints_that_saved_n_still_load():
    """fusedjd 0.1's GradVac saved the number of columns in `_extra_state`; the state no longer
    depends on n, and such checkpoints still load strictly and continue the run."""
    src = fusedjd.GradVac()
    J = torch.randn(4, 30)
    torch.manual_seed(0)
    src(J)
    sd = src.state_dict()
    sd["_extra_state"] = {"n": 30}
    dst = fusedjd.GradVac()
    dst.load_state_dict(sd)
    torch.manual_seed(1)
    expected = src(J)
    torch.manual_seed(1)
    assert torch.equal(dst(J), expected)


@pytest.mark.parametrize("make", [fusedjd.GradVac, fusedjd.PCGrad, lambda: fusedjd.GroupedGradVac([5, 3]),
                                  fusedjd.MoCo])
def test_calls_run_hooks_and_keep_grad_out(make):
    """An aggregator's call takes a short path when nothing runs around forward; hooks on it (its
    own and global ones) still run, and a matrix that requires grad still gives an output that
    does not, equal to the short path's."""
    J = torch.randn(3, 8)
    torch.manual_seed(0)
    plain = make()(J)
    seen = []
    agg = make()
    agg.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    agg.register_forward_hook(lambda mod, args, out: seen.append(out))
    torch.manual_seed(0)
    out = agg(J)
    assert seen[0] == "pre" and seen[1] is out and torch.equal(out, plain)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append("global"))
    try:
        torch.manual_seed(0)  # (a global hook also runs on the submodules: MoCo then forms λᵀY apart)
        assert torch.allclose(make()(J), plain, rtol=1e-6, atol=1e-7) and "global" in seen
    finally:
        handle.remove()
    torch.manual_seed(0)
    out = make()(J.clone().requires_grad_())
    assert not out.requires_grad and torch.equal(out, plain)
