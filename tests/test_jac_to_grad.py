"""fusedjd.jac_to_grad against torchjd.autojac.jac_to_grad (both of its modes) on real models: the
same gradients, weights, state and errors, and no m x n buffer on the fused path."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchjd.aggregation import MGDA, DualProj, UPGrad
from torchjd.aggregation import Aggregator
from torchjd.aggregation import GradVac as TorchjdGradVac
from torchjd.aggregation import PCGrad as TorchjdPCGrad
from torchjd.autojac import jac_to_grad as torchjd_jac_to_grad
from torchjd.autojac import mtl_backward

import fusedjd
from fusedjd import reference
from fusedjd.reference import rel_err

TASKS = 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh())

    def forward(self, x):
        return self.body(x)

    @staticmethod
    def inputs(gen):
        return torch.randn(32, 12, generator=gen)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, bias=True), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(5 * 4 * 4, 16))

    def forward(self, x):
        return self.body(x)

    @staticmethod
    def inputs(gen):
        return torch.randn(8, 3, 8, 8, generator=gen)


class Attention(nn.Module):
    """Multi-head attention (its packed in-projection and its out-projection), then a learned scale.
    (A non-leaf tensor that retains its grad cannot be among the shared tensors: mtl_backward's
    vmap leaks a batched tensor into its .grad, and torchjd's jac_to_grad fails on it too.)"""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.log_scale = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return (y * self.log_scale.exp()).mean(1)

    @staticmethod
    def inputs(gen):
        return torch.randn(4, 5, 8, generator=gen)


MODELS = {"mlp": MLP, "cnn": CNN, "attention": Attention}


def _setup(model_name: str, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    model = MODELS[model_name]().to(dtype=dtype, device=device)
    width = 16 if model_name != "attention" else 8
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(TASKS)).to(dtype=dtype, device=device)
    return model, heads


def _backward(model, heads, gen, dtype):
    x = model.inputs(gen).to(dtype=dtype, device=next(model.parameters()).device)
    features = model(x)
    losses = [(h(features) ** 2).mean() for h in heads]
    shared = list(model.parameters())
    mtl_backward(losses, features=features, shared_params=shared)
    return shared


def _run(j2g, make_agg, model_name, dtype, steps=3, device="cpu", **kwargs):
    """`steps` training steps through j2g; returns the weights and the .grad of every step."""
    model, heads = _setup(model_name, dtype, device=device)
    agg = make_agg()
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the aggregators' draws
    opt = torch.optim.SGD([*model.parameters(), *heads.parameters()], lr=0.05)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        shared = _backward(model, heads, gen, dtype)
        w = j2g(shared, agg, **kwargs)
        history.append((w, [t.grad.clone() for t in shared]))
        opt.step()
    return history, agg


def _close(a, b, dtype):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, **tol)


class _ReferenceMoCo(Aggregator):
    """Plain float64 MoCo (:class:`fusedjd.reference.MoCo`) as a torchjd aggregator: what torchjd's
    jac_to_grad is handed on the other side of fusedjd's MoCo (torchjd 0.18 has no MoCo)."""

    def __init__(self, **hyper):
        super().__init__()
        self.moco = reference.MoCo(**hyper)

    def forward(self, matrix):
        return self.moco(matrix)[1].to(matrix.dtype)


# name: (ours, theirs): fusedjd's aggregator through fusedjd.jac_to_grad against independent code
# through torchjd's jac_to_grad (torchjd's own class, or the float64 reference where torchjd has none)
AGGREGATORS = {
    "GradVac": (lambda: fusedjd.GradVac(beta=0.3), lambda: TorchjdGradVac(beta=0.3)),
    "PCGrad": (fusedjd.PCGrad, TorchjdPCGrad),
    "MoCo": (lambda: fusedjd.MoCo(gamma=0.5), lambda: _ReferenceMoCo(gamma=0.5)),
    "UPGrad": (fusedjd.UPGrad, UPGrad),
    "torchjd UPGrad": (UPGrad, UPGrad),
    "MGDA": (fusedjd.MGDA, MGDA),
    "torchjd MGDA": (MGDA, MGDA),
    "DualProj": (fusedjd.DualProj, DualProj),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg_name", list(AGGREGATORS))
def test_equals_torchjd_jac_to_grad(model_name, dtype, agg_name):
    ours_make, theirs_make = AGGREGATORS[agg_name]
    ours, agg = _run(fusedjd.jac_to_grad, ours_make, model_name, dtype)
    modes = [{}]
    if agg_name != "MoCo":  # torchjd's Gramian mode needs a GramianWeightedAggregator
        modes.append({"optimize_gramian_computation": True})
    for mode in modes:
        theirs, _ = _run(torchjd_jac_to_grad, theirs_make, model_name, dtype, **mode)
        for (w1, g1), (w2, g2) in zip(ours, theirs, strict=True):
            _close(w1, w2, dtype)
            for a, b in zip(g1, g2, strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape
                _close(a, b, dtype)
    if agg_name == "MoCo":  # the state is one flat [m, n] buffer
        n = sum(t.numel() for t in _setup(model_name, dtype)[0].parameters())
        assert agg.y.shape[0] == TASKS and agg.y.shape[1] >= n and int(agg.step) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradvac_equals_torchjds_own_gradvac(dtype):
    """fusedjd's GradVac through fusedjd.jac_to_grad against torchjd's GradVac through torchjd's
    jac_to_grad: independent code on both sides, the same draws."""
    ours, _ = _run(fusedjd.jac_to_grad, lambda: fusedjd.GradVac(beta=0.3), "cnn", dtype, steps=4)
    theirs, _ = _run(torchjd_jac_to_grad, lambda: TorchjdGradVac(beta=0.3), "cnn", dtype, steps=4)
    for (w1, g1), (w2, g2) in zip(ours, theirs, strict=True):
        _close(w1, w2, dtype)
        for a, b in zip(g1, g2, strict=True):
            _close(a, b, dtype)


def test_grouped_gradvac_by_layer_equals_torchjd():
    model, _ = _setup("mlp", torch.float64)
    groups = fusedjd.groups.all_layer(model)
    ours, _ = _run(fusedjd.jac_to_grad, lambda: fusedjd.GroupedGradVac(groups), "mlp", torch.float64)
    theirs, _ = _run(torchjd_jac_to_grad, lambda: fusedjd.GroupedGradVac(groups), "mlp", torch.float64)
    for (w1, g1), (w2, g2) in zip(ours, theirs, strict=True):
        assert w1 is None and w2 is None
        for a, b in zip(g1, g2, strict=True):
            _close(a, b, torch.float64)


def test_grouping_that_cuts_a_tensor_is_refused_and_nothing_is_lost():
    model, heads = _setup("mlp", torch.float32)
    shared = _backward(model, heads, torch.Generator().manual_seed(0), torch.float32)
    jacs = [t.jac.clone() for t in shared]
    n = sum(t.numel() for t in shared)
    with pytest.raises(ValueError, match=r"group 0 .* ends at column 100, inside a tensor"):
        fusedjd.jac_to_grad(shared, fusedjd.GroupedGradVac([100, n - 100]))
    with pytest.raises(ValueError, match=rf"must sum to the number of Jacobian columns n={n}"):
        fusedjd.jac_to_grad(shared, fusedjd.GroupedGradVac([n + 1]))
    for t, j in zip(shared, jacs):
        assert torch.equal(t.jac, j) and t.grad is None


@pytest.mark.parametrize("retain_jac", [False, True])
def test_accumulates_into_existing_grad_and_retain_jac(retain_jac):
    for j2g in (fusedjd.jac_to_grad, torchjd_jac_to_grad):
        model, heads = _setup("mlp", torch.float64)
        shared = _backward(model, heads, torch.Generator().manual_seed(0), torch.float64)
        for t in shared:
            t.grad = torch.full_like(t, 0.5)
        jacs = [t.jac.clone() for t in shared]
        w = j2g(shared, UPGrad(), retain_jac=retain_jac)
        expected = [0.5 + torch.tensordot(w, j, dims=1) for j in jacs]
        for t, e, j in zip(shared, expected, jacs):
            torch.testing.assert_close(t.grad, e, rtol=1e-12, atol=1e-14)
            assert hasattr(t, "jac") == retain_jac
            if retain_jac:
                assert torch.equal(t.jac, j)


def test_a_tensor_listed_twice_accumulates_as_torchjds():
    grads = []
    for j2g in (fusedjd.jac_to_grad, torchjd_jac_to_grad):
        p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        p.__setattr__("jac", torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], dtype=torch.float64))
        j2g([p, p], UPGrad(), retain_jac=True)
        grads.append(p.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_an_empty_parameter_among_the_tensors():
    """A tensor with no element (its .jac is [m, 0]) takes no column and gets an empty gradient."""
    ps = [torch.zeros(2, 3, requires_grad=True), torch.zeros(0, requires_grad=True)]
    ps[0].__setattr__("jac", torch.tensor([[1.0, 0, 0, 0, 2, 0], [0, 1.0, 0, 3, 0, 0]]).reshape(2, 2, 3))
    ps[1].__setattr__("jac", torch.zeros(2, 0))
    w = fusedjd.jac_to_grad(ps, UPGrad())
    assert ps[1].grad.shape == (0,) and w.shape == (2,)
    torch.testing.assert_close(ps[0].grad.reshape(-1), w @ torch.tensor([[1.0, 0, 0, 0, 2, 0], [0, 1.0, 0, 3, 0, 0]]))


def test_refusals_are_torchjds():
    model, heads = _setup("mlp", torch.float32)
    shared = _backward(model, heads, torch.Generator().manual_seed(0), torch.float32)
    stray = torch.zeros(3, requires_grad=True)  # received no .jac
    for j2g in (fusedjd.jac_to_grad, torchjd_jac_to_grad):
        with pytest.raises(ValueError, match=r"Some `jac` fields were not populated") as e:
            j2g([*shared, stray], fusedjd.GradVac())
        with pytest.raises(ValueError, match=r"The `tensors` parameter cannot be empty"):
            j2g([], fusedjd.GradVac())
    assert all(hasattr(t, "jac") and t.grad is None for t in shared), e
    bad = torch.zeros(2, requires_grad=True)
    bad.__setattr__("jac", torch.zeros(4, 2))  # m = 4 against 3
    for j2g in (fusedjd.jac_to_grad, torchjd_jac_to_grad):
        with pytest.raises(ValueError, match=r"^All Jacobians in `tensors\.jac` should have the same number of rows\.$"):
            j2g([*shared, bad], fusedjd.GradVac())


def test_hooks_go_through_torchjd_and_run():
    calls = []
    agg = UPGrad()
    agg.weighting.register_forward_hook(lambda *a: calls.append("weighting"))
    ours, _ = _run(fusedjd.jac_to_grad, lambda: agg, "mlp", torch.float64, steps=1)
    assert calls == ["weighting"]
    theirs, _ = _run(torchjd_jac_to_grad, UPGrad, "mlp", torch.float64, steps=1)
    for a, b in zip(ours[0][1], theirs[0][1]):
        _close(a, b, torch.float64)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 6e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("make", [UPGrad, fusedjd.UPGrad])
def test_half_jacobians(dtype, bound, make):
    """fp16/bf16 .jac: the Gramian in float32, gradients written in the parameters' dtype. Weights
    and gradients against torchjd's UPGrad weighting (quadprog) in float64 on the very same .jac
    values, for two models whose tasks conflict (rows at cosines down to -0.47 and -0.31): measured
    at most 2.0e-3 (bfloat16) and 2.8e-4 (float16) relative, the weights' rounding to the .jac's
    dtype (bounds 6e-3 and 1e-3); the Mean of the rows is 44 % and 24 % away."""
    for seed in (2, 4):
        model, heads = _setup("mlp", dtype, seed=seed)
        shared = _backward(model, heads, torch.Generator().manual_seed(1), dtype)
        J = torch.cat([t.jac.reshape(TASKS, -1) for t in shared], dim=1).double()  # the same values, exactly
        weights = fusedjd.jac_to_grad(shared, make())
        expected_w = UPGrad().gramian_weighting(J @ J.T)  # torchjd, float64
        expected = expected_w @ J
        assert weights.dtype == dtype  # torchjd's weights have the dtype of its (.jac-dtype) Gramian
        assert rel_err(weights, expected_w) <= bound, (seed, rel_err(weights, expected_w))
        assert all(t.grad.dtype == dtype for t in shared)
        got = torch.cat([t.grad.flatten() for t in shared])
        assert rel_err(got, expected) <= bound, (seed, rel_err(got, expected))
        assert rel_err(J.mean(0), expected) > 0.2  # the projection matters on these: Mean fails the bound


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize("agg_name", ["GradVac", "UPGrad", "MoCo"])
def test_no_m_by_n_buffer(agg_name):
    """The largest tensor the fused path allocates is the gradient vector (n elements), never an
    m x n one; torchjd's default path allocates the concatenation (the counter sees it)."""
    def one(j2g):
        model, heads = _setup("mlp", torch.float32)
        agg = AGGREGATORS[agg_name][0]()
        gen = torch.Generator().manual_seed(0)
        if agg_name == "MoCo":  # the state exists after a first step
            j2g(_backward(model, heads, gen, torch.float32), agg)
            model.zero_grad()
        shared = _backward(model, heads, gen, torch.float32)
        n = sum(t.numel() for t in shared)
        return _largest_allocation(lambda: j2g(shared, agg)), n

    ours, n = one(fusedjd.jac_to_grad)
    theirs, _ = one(torchjd_jac_to_grad)
    assert ours < TASKS * n * 4 and ours <= n * 4 + 1024, (ours, n)
    assert theirs >= TASKS * n * 4, (theirs, n)


@pytest.mark.slow
@pytest.mark.parametrize("make", [lambda: fusedjd.GradVac(beta=0.3), lambda: fusedjd.MoCo(),
                                  lambda: fusedjd.GroupedGradVac([15, 0, 4])], ids=["GradVac", "MoCo", "Grouped"])
def test_compiled_fullgraph(make):
    """fusedjd.jac_to_grad compiles without graph breaks (with retain_jac=True: deleting a tensor
    attribute is beyond torch.compile, so a compiled step deletes the .jac fields outside) and
    matches eager, state included, over two steps."""
    gen = torch.Generator().manual_seed(0)
    jacs = [[torch.randn(3, 5, 3, generator=gen), torch.randn(3, 4, generator=gen)] for _ in range(2)]

    def run(compiled: bool):
        torch._dynamo.reset()
        torch.manual_seed(7)
        ps = [torch.zeros(5, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]
        agg = make()
        fn = lambda: fusedjd.jac_to_grad(ps, agg, retain_jac=True)  # noqa: E731
        fn = torch.compile(fn, fullgraph=True) if compiled else fn
        out = []
        for step_jacs in jacs:
            for p, j in zip(ps, step_jacs):
                p.jac, p.grad = j.clone(), None
            w = fn()
            out.append((w, [p.grad.clone() for p in ps]))
        return out, agg.state_dict()

    (eager, s1), (compiled, s2) = run(False), run(True)
    for (w1, g1), (w2, g2) in zip(eager, compiled):
        _close(w1, w2, torch.float32)
        for a, b in zip(g1, g2):
            _close(a, b, torch.float32)
    for k in s1:
        if isinstance(s1[k], torch.Tensor):
            torch.testing.assert_close(s1[k], s2[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA jac_to_grad path runs on a GPU only")
@pytest.mark.parametrize("agg_name", ["GradVac", "MoCo", "UPGrad"])
def test_cuda_equals_cpu(agg_name):
    cpu, _ = _run(fusedjd.jac_to_grad, AGGREGATORS[agg_name][0], "cnn", torch.float64)
    gpu, _ = _run(fusedjd.jac_to_grad, AGGREGATORS[agg_name][0], "cnn", torch.float64, device="cuda")
    for (w1, g1), (w2, g2) in zip(cpu, gpu, strict=True):
        _close(w1, None if w2 is None else w2.cpu(), torch.float64)
        for a, b in zip(g1, g2, strict=True):
            _close(a, b.cpu(), torch.float64)


def _bad_call(kind: str):
    """Tensors with .jac fields (and the jac_to_grad keywords) that jac_to_grad must refuse."""
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(2, requires_grad=True)
    p.jac, q.jac = torch.randn(3, 4), torch.randn(3, 2)
    kw = {}
    if kind == "jac_does_not_fit":
        q.jac = torch.randn(3, 5)
    elif kind == "grad_dtype":  # a .grad that must be float64, for a float32 gradient
        q.grad_dtype = torch.float64
    elif kind == "listed_twice":
        return [p, q, p], kw
    return [p, q], kw


# Tensor.grad_dtype (a .grad dtype other than the tensor's, refused by accumulation) exists from
# torch 2.10 on; on older torch the attribute is a plain Python one that nothing reads
_NO_GRAD_DTYPE = pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"),
                                    reason=f"torch {torch.__version__} has no Tensor.grad_dtype (torch >= 2.10)")


@pytest.mark.parametrize("kind", ["jac_does_not_fit", pytest.param("grad_dtype", marks=_NO_GRAD_DTYPE), "listed_twice"])
@pytest.mark.parametrize("route", ["fused", "fused torchjd weighting", "torchjd"])
def test_a_refused_call_changes_nothing(kind, route):
    """The error torchjd's jac_to_grad raises (type and message), but raised before any .jac is
    deleted, any .grad is filled or any aggregator state moves: on the fused path and on calls
    handed to torchjd (here: an aggregator with a forward hook)."""
    def make():
        if route == "fused":
            return fusedjd.GradVac()
        if route == "fused torchjd weighting":
            return UPGrad()
        agg = fusedjd.GradVac()
        agg.register_forward_hook(lambda *a: None)
        return agg

    agg = make()
    warm = torch.zeros(6, requires_grad=True)
    warm.jac = torch.randn(3, 6)
    fusedjd.jac_to_grad([warm], agg)  # some state to keep
    state = {k: v.clone() for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}
    tensors, kw = _bad_call(kind)
    jacs = {id(t): t.jac for t in tensors}
    theirs, _ = _bad_call(kind)
    with pytest.raises(Exception) as expected:
        torchjd_jac_to_grad(theirs, make(), **kw)
    with pytest.raises(type(expected.value), match=f"^{re.escape(str(expected.value))}$"):
        fusedjd.jac_to_grad(tensors, agg, **kw)
    assert all(t.jac is jacs[id(t)] and t.grad is None for t in tensors)
    after = {k: v for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_optimize_gramian_refusal_keeps_the_jacs():
    """torchjd refuses optimize_gramian_computation for an aggregator that is not Gramian-based only
    after deleting the .jac fields; fusedjd refuses first."""
    p = torch.zeros(4, requires_grad=True)
    p.jac = torch.randn(3, 4)
    agg = UPGrad()
    agg.register_forward_hook(lambda *a: None)  # hooked: torchjd's path, which refuses the option
    with pytest.raises(ValueError, match="optimize_gramian_computation=True"):
        fusedjd.jac_to_grad([p], agg, optimize_gramian_computation=True)
    assert hasattr(p, "jac") and p.grad is None


@pytest.mark.parametrize("make", [fusedjd.GradVac, fusedjd.PCGrad, fusedjd.MoCo, UPGrad,
                                  lambda: fusedjd.GroupedGradVac([4, 2])])
def test_a_jac_that_requires_grad_gives_a_grad_that_does_not(make):
    """fusedjd's aggregation is not differentiable: a .jac that requires grad (create_graph=True)
    gives a .grad and weights that do not, as torchjd's jac_to_grad gives for these aggregators."""
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(2, requires_grad=True)
    p.jac = torch.randn(3, 4, requires_grad=True)
    q.jac = torch.randn(3, 2, requires_grad=True)
    weights = fusedjd.jac_to_grad([p, q], make())
    assert not p.grad.requires_grad and not q.grad.requires_grad
    assert weights is None or not weights.requires_grad
