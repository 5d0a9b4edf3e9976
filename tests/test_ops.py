"""The ops against independent float64 references, opcheck, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch

import fusedjd
from fusedjd import ops
from fusedjd._base import draw_gradvac_perms, draw_pcgrad_perms

from conftest import DEVICES, MoCoRef, ref_gradvac_loop, ref_gramians, rel_err

SHAPES = [(1, 1), (1, 17), (2, 1), (3, 5), (5, 33), (8, 1001), (16, 257), (7, 70001), (32, 129)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _split(n: int, k: int, gen: torch.Generator) -> list[int]:
    """k random non-negative group sizes summing to n (some may be 0)."""
    if k == 1:
        return [n]
    cuts = sorted(torch.randint(0, n + 1, (k - 1,), generator=gen).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_gramian_matches_float64(device, dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    J = torch.randn(m, n, generator=gen).to(dtype)
    sizes = _split(n, k, gen)
    G = ops.gramian(J.to(device), sizes)
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert G.shape == (k, m, m)
    assert rel_err(G, ref_gramians(J, sizes)) < TOL[dtype]
    assert torch.equal(G.cpu(), G.cpu().transpose(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_gramian_many_small_groups_and_views(device):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(9, 3 * 5003 + 1, generator=gen, dtype=torch.float64)
    J = base[1:, 1::3]  # misaligned, strided view: 8 x 5001
    sizes = _split(J.shape[1], 1000, gen)
    G = ops.gramian(J.to(device), sizes)
    assert rel_err(G, ref_gramians(J, sizes)) < 1e-12
    Jt = torch.randn(5003, 6, generator=gen, dtype=torch.float64).T  # column stride != 1
    assert rel_err(ops.gramian(Jt.to(device), [5003]), ref_gramians(Jt, [5003])) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_gramian_special_inputs(device):
    v = torch.randn(1, 301, dtype=torch.float64)
    for J in [
        torch.cat([v, 3 * v, -2 * v]),                      # collinear
        torch.cat([v, torch.zeros_like(v), v]),             # zero row
        torch.cat([v, -v]) * 1e15,                          # scaled
        torch.cat([v, 2 * v]) * 1e-15,
    ]:
        assert rel_err(ops.gramian(J.to(device), [100, 201]), ref_gramians(J, [100, 201])) < 1e-12
    assert ops.gramian(torch.empty(0, 5, device=device), [5]).shape == (1, 0, 0)
    G = ops.gramian(torch.empty(3, 0, device=device), [0])
    assert G.shape == (1, 3, 3) and not G.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n", SHAPES)
def test_combine_matches_float64(device, dtype, m, n):
    gen = torch.Generator().manual_seed(m + n)
    J = torch.randn(m, n, generator=gen).to(dtype)
    sizes = _split(n, 4, gen)
    W = torch.randn(4, m, generator=gen)
    out = ops.combine(J.to(device), W.to(device), sizes)
    assert out.dtype == dtype and out.shape == (n,)
    ref, start = [], 0
    for g, s in enumerate(sizes):
        ref.append(W[g].double() @ J[:, start : start + s].double())
        start += s
    assert rel_err(out, torch.cat(ref)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_combine_empty(device):
    assert torch.equal(ops.combine(torch.empty(0, 7, device=device), torch.empty(1, 0, device=device), [7]).cpu(),
                       torch.zeros(7))
    assert ops.combine(torch.empty(3, 0, device=device), torch.ones(1, 3, device=device), [0]).shape == (0,)


def _random_gramian_stack(k, m, dtype, gen, kind="random"):
    J = torch.randn(k, m, 3 * m + 2, generator=gen, dtype=torch.float64)
    if kind == "collinear":
        J = torch.randn(k, m, 1, generator=gen, dtype=torch.float64) * J[:, :1, :]
    elif kind == "zero_row" and m > 1:
        J[:, 1] = 0
    elif kind == "scaled":
        J = J * 1e5
    return (J @ J.transpose(1, 2)).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 8, 16, 33])
@pytest.mark.parametrize("kind", ["random", "zero_row", "scaled"])
def test_gradvac_loop_matches_reference(device, dtype, m, kind):
    gen = torch.Generator().manual_seed(31 * m + len(kind))
    k = 3
    targets = torch.zeros(k, m, m, dtype=dtype, device=device)
    targets_ref = torch.zeros(k, m, m, dtype=torch.float64)
    for call in range(4):  # the targets evolve
        G = _random_gramian_stack(k, m, dtype, gen, kind)
        perms = draw_gradvac_perms(k, m)
        W = ops.gradvac_loop(G.to(device), perms.to(device), targets, 0.3, 1e-8)
        W_ref = ref_gradvac_loop(G, perms, targets_ref, 0.3, 1e-8)
        assert W.shape == (k, m) and W.dtype == dtype
        tol = 1e-10 if dtype == torch.float64 else 2e-4
        assert rel_err(W, W_ref) < tol, call
        assert rel_err(targets, targets_ref) < tol, call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [0, 1, 2, 5, 16])
def test_pcgrad_loop_matches_reference(device, m):
    gen = torch.Generator().manual_seed(m)
    G = _random_gramian_stack(2, m, torch.float64, gen)
    perms = draw_pcgrad_perms(2, m)
    W = ops.pcgrad_loop(G.to(device), perms.to(device))
    W_ref = ref_gradvac_loop(G, perms, torch.zeros(2, m, m, dtype=torch.float64), 0.0, 0.0, pcgrad=True)
    assert rel_err(W, W_ref) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_gradvac_loop_nonfinite_keeps_targets(device):
    gen = torch.Generator().manual_seed(3)
    G = _random_gramian_stack(2, 4, torch.float32, gen).to(device)
    targets = torch.rand(2, 4, 4, generator=gen).to(device) - 0.5
    before = targets.clone()
    for bad in [float("nan"), float("inf")]:
        Gb = G.clone()
        Gb[1, 2, 3] = bad
        W = ops.gradvac_loop(Gb, draw_gradvac_perms(2, 4).to(device), targets, 0.5, 1e-8)
        assert torch.isnan(W).all()
        assert torch.equal(targets, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n", [(1, 9), (2, 101), (5, 1001), (8, 40000), (3, 1)])
@pytest.mark.parametrize("simplex", ["softmax", "projection"])
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_moco_step_matches_reference(device, dtype, m, n, simplex, rho):
    gen = torch.Generator().manual_seed(m * n)
    ref = MoCoRef(beta=0.6, beta_sigma=0.4, gamma=0.7, gamma_sigma=0.3, rho=rho, simplex=simplex)
    Y = torch.zeros(m, n, dtype=dtype, device=device)
    lam = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
    step = torch.zeros((), dtype=torch.long, device=device)
    for k in range(1, 6):
        J = torch.randn(m, n, generator=gen, dtype=dtype)
        w, out = ops.moco_step(J.to(device), Y, lam, step, 0.6, 0.4, 0.7, 0.3, rho, simplex == "projection")
        w_ref, out_ref = ref(J)
        # float32: the Gramian terms accumulate in float32 (BLAS), and the weight update
        # amplifies their rounding by c_k * |J|^2
        tol = 1e-11 if dtype == torch.float64 else 2e-4
        assert rel_err(w, w_ref) < tol
        assert rel_err(out, out_ref) < tol
        assert rel_err(Y, ref.Y) < tol
        assert torch.equal(lam, w) and int(step) == k
        assert abs(float(w.sum()) - 1) < 1e-5 and bool((w >= 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moco_step_reduced_precision(device, dtype):
    gen = torch.Generator().manual_seed(11)
    m, n = 4, 3001
    ref = MoCoRef()
    Y = torch.zeros(m, n, dtype=dtype, device=device)
    lam = torch.full((m,), 0.25, dtype=torch.float32, device=device)
    step = torch.zeros((), dtype=torch.long, device=device)
    for _ in range(3):
        J = torch.randn(m, n, generator=gen).to(dtype)
        w, out = ops.moco_step(J.to(device), Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.0, False)
        w_ref, out_ref = ref(J)
        assert rel_err(w, w_ref) < 1e-2 and rel_err(out, out_ref) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_moco_step_nonfinite_keeps_state(device):
    m, n = 3, 50
    Y = torch.randn(m, n, device=device)
    lam = torch.tensor([0.2, 0.3, 0.5], device=device)
    step = torch.tensor(4, device=device)
    saved = (Y.clone(), lam.clone(), step.clone())
    for bad in [float("nan"), float("inf"), -float("inf")]:
        J = torch.randn(m, n, device=device)
        J[1, 17] = bad
        w, out = ops.moco_step(J, Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.0, False)
        assert torch.isnan(w).all() and torch.isnan(out).all()
        assert torch.equal(Y, saved[0]) and torch.equal(lam, saved[1]) and torch.equal(step, saved[2])


def _op_samples(device):
    gen = torch.Generator().manual_seed(5)
    J = torch.randn(4, 37, generator=gen).to(device)
    G = (J @ J.T).unsqueeze(0).repeat(2, 1, 1)
    return [
        (torch.ops.fusedjd.gramian.default, (J, [10, 27])),
        (torch.ops.fusedjd.gradvac_loop.default,
         (G, draw_gradvac_perms(2, 4).to(device), torch.zeros(2, 4, 4, device=device), 0.5, 1e-8)),
        (torch.ops.fusedjd.pcgrad_loop.default, (G, draw_pcgrad_perms(2, 4).to(device))),
        (torch.ops.fusedjd.combine.default, (J, torch.randn(2, 4, generator=gen).to(device), [10, 27])),
        (torch.ops.fusedjd.moco_step.default,
         (J, torch.zeros(4, 37, device=device), torch.full((4,), 0.25, device=device),
          torch.zeros((), dtype=torch.long, device=device), 0.5, 0.5, 0.1, 0.5, 0.0, False)),
    ]


def test_draw_perms_matches_torch_randperm_and_opcheck():
    for m in [0, 1, 2, 5, 33]:
        torch.manual_seed(7)
        got = torch.ops.fusedjd.draw_perms.default(2, m, False)
        after = torch.rand(1)
        torch.manual_seed(7)
        ref = [torch.randperm(m - 1) for _ in range(2 * m)] if m > 0 else []
        assert torch.equal(torch.rand(1), after)  # the generator advanced exactly as torch's
        for chain, P in enumerate(ref):
            i = chain % m
            assert torch.equal(got.reshape(2 * m, max(m - 1, 0))[chain], P + (P >= i))
        assert got.shape == (2, m, max(m - 1, 0))
    torch.manual_seed(1)
    pc = draw_pcgrad_perms(1, 6)
    torch.manual_seed(1)
    ref = [torch.randperm(6) for _ in range(6)]
    for i, P in enumerate(ref):
        assert torch.equal(pc[0, i], P[P != i])
    torch.library.opcheck(torch.ops.fusedjd.draw_perms.default, (3, 4, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(5))
def test_opcheck(device, index):
    op, args = _op_samples(device)[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("index", range(5))
def test_compile_each_op_fullgraph(index):
    op, args = _op_samples("cpu")[index]
    clone = lambda a: [x.clone() if isinstance(x, torch.Tensor) else x for x in a]  # noqa: E731
    eager_args, compiled_args = clone(args), clone(args)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: op(*a), fullgraph=True)
    expected = op(*eager_args)
    got = fn(*compiled_args)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, e)
    for e, g in zip(eager_args, compiled_args):  # in-place updates too
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(g, e)


def test_errors_name_the_argument():
    J = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match=r"`J` must have 2 dimensions, got shape \[3, 10, 1\]"):
        ops.gramian(J.unsqueeze(-1), [10])
    with pytest.raises(RuntimeError, match=r"`J` must be a floating-point tensor, got dtype Long"):
        ops.gramian(J.long(), [10])
    with pytest.raises(RuntimeError, match=r"`group_sizes` must sum to the number of columns n=10, got sum 9"):
        ops.gramian(J, [4, 5])
    with pytest.raises(RuntimeError, match=r"`group_sizes` must be non-negative, got -1 at position 1"):
        ops.gramian(J, [11, -1])
    with pytest.raises(RuntimeError, match=r"`weights` must have shape \[k, m\] = \[2, 3\], got \[2, 4\]"):
        ops.combine(J, torch.ones(2, 4), [5, 5])
    G = (J @ J.T).unsqueeze(0)
    with pytest.raises(RuntimeError, match=r"`perms` must have shape \[k, m, m-1\] = \[1, 3, 2\]"):
        ops.gradvac_loop(G, torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 3, 3), 0.5, 1e-8)
    # an invalid visit order (row 0 visiting itself) is refused as a non-finite G is, on every
    # backend: NaN weights, targets untouched (tests/test_cuda_emulated.py checks the CUDA kernel)
    T = torch.full((1, 3, 3), 0.25)
    assert torch.isnan(ops.gradvac_loop(G, torch.zeros(1, 3, 2, dtype=torch.long), T, 0.5, 1e-8)).all()
    assert torch.equal(T, torch.full((1, 3, 3), 0.25))
    with pytest.raises(RuntimeError, match=r"`targets` must have the dtype of `G` \(Float\), got Double"):
        ops.gradvac_loop(G, draw_gradvac_perms(1, 3), torch.zeros(1, 3, 3, dtype=torch.float64), 0.5, 1e-8)
    with pytest.raises(RuntimeError, match=r"`Y` must have the shape of `J`"):
        ops.moco_step(J, torch.zeros(3, 9), torch.ones(3), torch.zeros((), dtype=torch.long), 0.5, 0.5, 0.1, 0.5, 0.0,
                      False)
    with pytest.raises(RuntimeError, match=r"`step` must have dtype Long, got Float"):
        ops.moco_step(J, torch.zeros(3, 10), torch.ones(3), torch.zeros(()), 0.5, 0.5, 0.1, 0.5, 0.0, False)


def test_library_reports_cuda_build():
    assert isinstance(fusedjd.ops.has_cuda_kernels(), bool)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedjd::gramian", "CPU")
