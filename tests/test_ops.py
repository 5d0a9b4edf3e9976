"""The ops against independent float64 references, opcheck, torch.compile, and bad input."""

from __future__ import annotations

import os

import pytest
import torch

import fusedjd
from fusedjd import ops

from fusedjd import reference
from fusedjd.reference import TOLERANCE, rel_err

from conftest import DEVICES, DispatchRecorder, group_sizes

SHAPES = [(1, 1), (1, 17), (2, 1), (3, 5), (5, 33), (8, 1001), (16, 257), (7, 70001), (32, 129)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_gramian_matches_float64(device, dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    J = torch.randn(m, n, generator=gen).to(dtype)
    sizes = group_sizes(n, k, gen)
    G = ops.gramian(J.to(device), sizes)
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert G.shape == (k, m, m)
    assert rel_err(G, reference.gramian(J, sizes)) < TOLERANCE["gramian"][dtype]
    assert torch.equal(G.cpu(), G.cpu().transpose(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_gramian_many_small_groups_and_views(device):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(9, 3 * 5003 + 1, generator=gen, dtype=torch.float64)
    J = base[1:, 1::3]  # misaligned, strided view: 8 x 5001
    sizes = group_sizes(J.shape[1], 1000, gen)
    G = ops.gramian(J.to(device), sizes)
    assert rel_err(G, reference.gramian(J, sizes)) < 1e-12
    Jt = torch.randn(5003, 6, generator=gen, dtype=torch.float64).T  # column stride != 1
    assert rel_err(ops.gramian(Jt.to(device), [5003]), reference.gramian(Jt, [5003])) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_gramian_special_inputs(device):
    v = torch.randn(1, 301, dtype=torch.float64)
    for J in [
        torch.cat([v, 3 * v, -2 * v]),                      # collinear
        torch.cat([v, torch.zeros_like(v), v]),             # zero row
        torch.cat([v, -v]) * 1e15,                          # scaled
        torch.cat([v, 2 * v]) * 1e-15,
    ]:
        assert rel_err(ops.gramian(J.to(device), [100, 201]), reference.gramian(J, [100, 201])) < 1e-12
    assert ops.gramian(torch.empty(0, 5, device=device), [5]).shape == (1, 0, 0)
    G = ops.gramian(torch.empty(3, 0, device=device), [0])
    assert G.shape == (1, 3, 3) and not G.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n", SHAPES)
def test_combine_matches_float64(device, dtype, m, n):
    gen = torch.Generator().manual_seed(m + n)
    J = torch.randn(m, n, generator=gen).to(dtype)
    sizes = group_sizes(n, 4, gen)
    W = torch.randn(4, m, generator=gen)
    out = ops.combine(J.to(device), W.to(device), sizes)
    assert out.dtype == dtype and out.shape == (n,)
    assert rel_err(out, reference.combine(J, W, sizes)) < TOLERANCE["combine"][dtype]


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
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 8, 16, pytest.param(33, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["random", "zero_row", "scaled"])
def test_gradvac_loop_matches_reference(device, dtype, m, kind):
    gen = torch.Generator().manual_seed(31 * m + len(kind))
    k = 3
    targets = torch.zeros(k, m, m, dtype=dtype, device=device)
    targets_ref = torch.zeros(k, m, m, dtype=torch.float64)
    for call in range(4):  # the targets evolve
        G = _random_gramian_stack(k, m, dtype, gen, kind)
        perms = ops.draw_perms(k, m, pcgrad=False)
        W = ops.gradvac_loop(G.to(device), perms.to(device), targets, 0.3, 1e-8)
        W_ref = reference.gradvac_loop(G, perms, targets_ref, 0.3, 1e-8)
        assert W.shape == (k, m) and W.dtype == dtype
        tol = 1e-10 if dtype == torch.float64 else 2e-4
        assert rel_err(W, W_ref) < tol, call
        assert rel_err(targets, targets_ref) < tol, call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [2, 3, 8])
def test_gradvac_loop_collinear_rows(device, dtype, m):
    """Collinear rows of both signs cancel to rounding noise, whose cosines are noise too: targets
    cannot be compared entry by entry, but the aggregated vector ``w J`` can (its error measured in
    the Gramian's norm, relative to ``sqrt(trace G)``), and every target stays a cosine."""
    gen = torch.Generator().manual_seed(m)
    G = _random_gramian_stack(2, m, torch.float64, gen, "collinear")
    perms = ops.draw_perms(2, m, pcgrad=False)
    targets = torch.zeros(2, m, m, dtype=dtype, device=device)
    W = ops.gradvac_loop(G.to(dtype).to(device), perms.to(device), targets, 0.5, 1e-8).double().cpu()
    W_ref = reference.gradvac_loop(G.to(dtype), perms, torch.zeros(2, m, m, dtype=torch.float64), 0.5, 1e-8)
    d = W - W_ref
    err = torch.einsum("ki,kij,kj->k", d, G, d).clamp(min=0).sqrt() / G.diagonal(dim1=1, dim2=2).sum(1).sqrt()
    # |p|² = C G C cancels too: |p| carries about sqrt(machine eps) of |g|, and so do the weights
    assert (err < 10 * torch.finfo(dtype).eps ** 0.5).all(), err
    assert targets.isfinite().all() and (targets.abs() <= 1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [0, 1, 2, 5, 16])
def test_pcgrad_loop_matches_reference(device, m):
    gen = torch.Generator().manual_seed(m)
    G = _random_gramian_stack(2, m, torch.float64, gen)
    perms = ops.draw_perms(2, m, pcgrad=True)
    W = ops.pcgrad_loop(G.to(device), perms.to(device))
    W_ref = reference.pcgrad_loop(G, perms)
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
        W = ops.gradvac_loop(Gb, ops.draw_perms(2, 4, pcgrad=False).to(device), targets, 0.5, 1e-8)
        assert torch.isnan(W).all()
        assert torch.equal(targets, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n", [(1, 9), (2, 101), (5, 1001), (8, 40000), (3, 1)])
@pytest.mark.parametrize("simplex", ["softmax", "projection"])
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_moco_step_matches_reference(device, dtype, m, n, simplex, rho):
    gen = torch.Generator().manual_seed(m * n)
    ref = reference.MoCo(beta=0.6, beta_sigma=0.4, gamma=0.7, gamma_sigma=0.3, rho=rho, simplex=simplex)
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
    ref = reference.MoCo()
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
    """Named (op, args) samples, several per op: every one goes through opcheck."""
    gen = torch.Generator().manual_seed(5)
    r = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=gen).to(dtype).to(device)  # noqa: E731
    J = r(4, 37)
    G = (J @ J.T).unsqueeze(0).repeat(2, 1, 1)
    Gd = G.double()
    wide = r(3, 2 * 41)[:, ::2]  # column stride 2
    tall = r(9, 20)[1:]  # row-offset view
    perms = lambda k, m, pc: ops.draw_perms(k, m, pcgrad=pc, device=device)  # noqa: E731
    zeros_step = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
    gram, loop, pc, comb, moco = (torch.ops.fusedjd.gramian.default, torch.ops.fusedjd.gradvac_loop.default,
                                  torch.ops.fusedjd.pcgrad_loop.default, torch.ops.fusedjd.combine.default,
                                  torch.ops.fusedjd.moco_step.default)
    cone = torch.ops.fusedjd.dual_cone.default
    return {
        "gramian-two-groups": (gram, ([J], [10, 27])),
        "gramian-list-group-spans-blocks": (gram, ([J[:, :5], r(4, 22)[:, ::2], J[:, 5:5], r(9, 20)[1:5]], [3, 30, 3])),
        "gramian-empty-group-strided": (gram, ([wide], [0, 41, 0])),
        "gramian-m1-bf16": (gram, ([r(1, 33, dtype=torch.bfloat16)], [33])),
        "gramian-f64-view": (gram, ([tall.double()], [7, 13])),
        "gradvac-f32": (loop, (G, perms(2, 4, False), torch.zeros(2, 4, 4, device=device), 0.5, 1e-8)),
        "gradvac-f64-targets": (loop, (Gd, perms(2, 4, False), 0.1 * Gd / Gd.abs().max(), 0.3, 0.0)),
        "gradvac-m1": (loop, (G[:, :1, :1], perms(2, 1, False), torch.zeros(2, 1, 1, device=device), 0.5, 1e-8)),
        "pcgrad-f32": (pc, (G, perms(2, 4, True))),
        "pcgrad-f64-m0": (pc, (Gd[:, :0, :0], perms(2, 0, True))),
        "combine-two-groups": (comb, ([J], r(2, 4), [10, 27])),
        "combine-list-bf16": (comb, ([J[:, :5].bfloat16(), J[:, 5:].bfloat16(), J[:, :0].bfloat16()], r(2, 4), [6, 31])),
        "combine-f16-strided": (comb, ([wide.half()], r(1, 3), [41])),
        "combine-f64-weights-f32": (comb, ([tall.double()], r(2, 8), [7, 13])),
        "moco-softmax": (moco, ([J], torch.zeros(4, 37, device=device), torch.full((4,), 0.25, device=device),
                                zeros_step(), 0.5, 0.5, 0.1, 0.5, 0.0, False)),
        "moco-projection-f64": (moco, ([J[:, :30].double(), J[:, 30:].double()], r(4, 37).double(), torch.full((4,), 0.25, device=device).double(),
                                       torch.full((), 3, dtype=torch.long, device=device), 0.9, 0.0, 0.5, 0.0, 0.1,
                                       True)),
        "aggregate-gradvac-list": (torch.ops.fusedjd.aggregate.default,
                                   ([J[:, :9], J[:, 9:]], [10, 27], torch.zeros(2, 4, 4, device=device), 0.5, 1e-8,
                                    False)),
        "aggregate-pcgrad-f64": (torch.ops.fusedjd.aggregate.default, ([J.double()], [37], None, 0.0, 0.0, True)),
        "moco-given-gram": (moco, ([J[:, :9], J[:, 9:]], torch.zeros(4, 37, device=device),
                                   torch.full((4,), 0.25, device=device), zeros_step(), 0.5, 0.5, 0.1, 0.5, 0.0, False,
                                   (J @ J.T).contiguous())),
        "moco-gramian-f64": (torch.ops.fusedjd.moco_gramian.default,
                             ([J.double()], r(4, 37).double(), torch.full((), 2, dtype=torch.long, device=device),
                              0.5, 0.5)),
        "moco-bf16": (moco, ([J.bfloat16()], torch.zeros(4, 37, device=device).bfloat16(),
                             torch.full((4,), 0.25, device=device), zeros_step(), 0.5, 0.5, 0.1, 0.5, 0.0, False)),
        "dual-cone-upgrad-f64": (cone, (torch.eye(4, dtype=torch.float64, device=device), Gd[0] + 0.1 * torch.eye(4, dtype=torch.float64, device=device))),
        "dual-cone-vector-f32": (cone, (r(4), G[0] + 0.1 * torch.eye(4, device=device))),
        "dual-cone-batch-u-f32-g-f64": (cone, (r(2, 3, 4), Gd[0] + 0.1 * torch.eye(4, dtype=torch.float64, device=device))),
        "dual-cone-m0": (cone, (r(3, 0), G[0, :0, :0])),
        "mgda-f32": (torch.ops.fusedjd.mgda.default, (G[0], 0.001, 100)),
        "mgda-f64-one-iteration": (torch.ops.fusedjd.mgda.default, (Gd[0], 0.5, 1)),
        "mgda-bf16-m1": (torch.ops.fusedjd.mgda.default, (G[0, :1, :1].bfloat16(), 1e-3, 10)),
        "mgda-m0": (torch.ops.fusedjd.mgda.default, (G[0, :0, :0], 1e-3, 10)),
    }


SAMPLES = list(_op_samples("cpu"))


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
    pc = ops.draw_perms(1, 6, pcgrad=True)
    torch.manual_seed(1)
    ref = [torch.randperm(6) for _ in range(6)]
    for i, P in enumerate(ref):
        assert torch.equal(pc[0, i], P[P != i])
    torch.library.opcheck(torch.ops.fusedjd.draw_perms.default, (3, 4, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck(device, name):
    op, args = _op_samples(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gramian-two-groups", "gradvac-f32", "pcgrad-f32", "combine-two-groups",
                                  "moco-softmax", "gramian-list-group-spans-blocks", "combine-list-bf16",
                                  "moco-projection-f64", "aggregate-gradvac-list", "dual-cone-upgrad-f64",
                                  "mgda-f32"])
def test_compile_each_op_fullgraph(name):
    op, args = _op_samples("cpu")[name]
    clone = lambda a: [x.clone() if isinstance(x, torch.Tensor) else x for x in a]  # noqa: E731
    eager_args, compiled_args = clone(args), clone(args)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: op(*a), fullgraph=True)
    torch.manual_seed(0)  # (aggregate draws its visit orders)
    expected = op(*eager_args)
    torch.manual_seed(0)
    got = fn(*compiled_args)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, e)
    for e, g in zip(eager_args, compiled_args):  # in-place updates too
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(g, e)


def test_errors_name_the_argument():
    J = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match=r"`J\[0\]` must have 2 dimensions, got shape \[3, 10, 1\]"):
        ops.gramian(J.unsqueeze(-1), [10])
    with pytest.raises(RuntimeError, match=r"`J\[0\]` must be a floating-point tensor, got dtype Long"):
        ops.gramian(J.long(), [10])
    with pytest.raises(RuntimeError, match=r"`group_sizes` must sum to the number of columns n=10, got sum 9"):
        ops.gramian(J, [4, 5])
    with pytest.raises(ValueError, match=r"`J` must hold at least one matrix, got an empty list"):
        ops.gramian([], [0])  # (the dispatcher cannot route a call without a tensor)
    with pytest.raises(RuntimeError, match=r"`J\[1\]` must have m=3 rows like `J\[0\]`, got shape \[2, 10\]"):
        ops.gramian([J, J[:2]], [20])
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
        ops.gradvac_loop(G, ops.draw_perms(1, 3, pcgrad=False), torch.zeros(1, 3, 3, dtype=torch.float64), 0.5, 1e-8)
    with pytest.raises(RuntimeError, match=r"`Y` must have shape \[m, n\]"):
        ops.moco_step(J, torch.zeros(3, 9), torch.ones(3), torch.zeros((), dtype=torch.long), 0.5, 0.5, 0.1, 0.5, 0.0,
                      False)
    with pytest.raises(RuntimeError, match=r"`step` must have dtype Long, got Float"):
        ops.moco_step(J, torch.zeros(3, 10), torch.ones(3), torch.zeros(()), 0.5, 0.5, 0.1, 0.5, 0.0, False)


def test_build_info_matches_the_registered_kernels():
    info = fusedjd.build_info()
    assert set(info) == {"cuda", "cuda_archs", "torch_version", "cpu_levels", "cpu_capability", "openmp"}
    for op in ["gramian", "gradvac_loop", "pcgrad_loop", "combine", "moco_step"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedjd::{op}", "CPU"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedjd::{op}", "CUDA") == info["cuda"], op
    assert ops.has_cuda_kernels() == info["cuda"]
    assert (info["cuda_archs"] != "") == info["cuda"]
    # the library runs in the torch it was built against (a mismatch would be an ABI hazard)
    assert info["torch_version"] == torch.__version__
    assert info["cpu_capability"] in info["cpu_levels"] or info["cpu_capability"] == "built-in"


# ---- m = 2 by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_m2_by_hand(device, dtype):
    t = lambda *v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    J = t([1.0, 2.0], [3.0, 4.0])
    # Gramians of the columns [1, 3] and [2, 4]
    G = ops.gramian(J, [1, 1])
    assert torch.equal(G.cpu(), torch.tensor([[[1.0, 3.0], [3.0, 9.0]], [[4.0, 8.0], [8.0, 16.0]]], dtype=dtype))
    # column 0: 1*1 + 2*3 = 7; column 1: 0.5*2 - 1*4 = -3
    assert torch.equal(ops.combine(J, t([1.0, 2.0], [0.5, -1.0]), [1, 1]).cpu(), torch.tensor([7.0, -3.0], dtype=dtype))
    # GradVac, orthonormal rows, target 0.5, beta 0.5, eps 0: the cosine 0 is below the target, so
    # each row gains w = (0.5 * 1 - 0) / sqrt(1 - 0.25) = 1/sqrt(3) of the other (which brings its
    # cosine with it to exactly 0.5); the targets move to 0.5 * 0.5 + 0.5 * 0 = 0.25.
    perms = ops.draw_perms(1, 2, pcgrad=False, device=device)
    assert perms.cpu().tolist() == [[[1], [0]]]
    targets = t([0.0, 0.5], [0.5, 0.0]).unsqueeze(0)
    W = ops.gradvac_loop(t([1.0, 0.0], [0.0, 1.0]).unsqueeze(0), perms, targets, 0.5, 0.0)
    torch.testing.assert_close(W.cpu(), torch.full((1, 2), 1 + 3**-0.5, dtype=dtype))
    torch.testing.assert_close(targets.cpu(), torch.tensor([[[0.0, 0.25], [0.25, 0.0]]], dtype=dtype))
    # PCGrad, G = [[1, -1], [-1, 4]]: row 0 removes -(-1)/4 of row 1, row 1 removes -(-1)/1 of row 0
    W = ops.pcgrad_loop(t([1.0, -1.0], [-1.0, 4.0]).unsqueeze(0), ops.draw_perms(1, 2, True, device))
    torch.testing.assert_close(W.cpu(), torch.tensor([[2.0, 1.25]], dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("projection", [False, True])
def test_moco_m2_by_hand(device, projection):
    # J = diag(1, 2), Y = 0, λ = (½, ½), first step: b = 0.5, c = 0.1, Y = diag(0.5, 1),
    # v = λ - 0.1 diag(0.25, 1) λ = (0.4875, 0.45)
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64, device=device)
    Y = torch.zeros(2, 2, dtype=torch.float64, device=device)
    lam = torch.full((2,), 0.5, dtype=torch.float64, device=device)
    step = torch.zeros((), dtype=torch.long, device=device)
    w, out = ops.moco_step(J, Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.0, projection)
    if projection:  # both coordinates stay: θ = (0.4875 + 0.45 - 1) / 2 = -0.03125
        expected = torch.tensor([0.51875, 0.48125], dtype=torch.float64)
    else:  # softmax of two values: sigmoid of their difference
        s = 1 / (1 + torch.exp(torch.tensor(-0.0375, dtype=torch.float64)))
        expected = torch.stack([s, 1 - s])
    torch.testing.assert_close(w.cpu(), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.cpu(), expected * torch.tensor([0.5, 1.0], dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.equal(Y.cpu(), torch.tensor([[0.5, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert step.item() == 1 and torch.equal(lam, w)


# ---- a compiled call fails as the eager one does --------------------------------------------


def _bad_calls():
    J = torch.randn(3, 10)
    G = (J @ J.T).unsqueeze(0)
    L = lambda *s: torch.zeros(s, dtype=torch.long)  # noqa: E731
    step = L()
    moco = torch.ops.fusedjd.moco_step.default
    h = (0.5, 0.5, 0.1, 0.5, 0.0, False)
    return {
        "gramian-rank": (torch.ops.fusedjd.gramian.default, ([J.unsqueeze(-1)], [10])),
        "gramian-dtype": (torch.ops.fusedjd.gramian.default, ([J.long()], [10])),
        "gramian-sum": (torch.ops.fusedjd.gramian.default, ([J], [4, 5])),
        "gramian-negative": (torch.ops.fusedjd.gramian.default, ([J], [11, -1])),
        "gramian-no-group": (torch.ops.fusedjd.gramian.default, ([J], [])),
        "combine-weights-shape": (torch.ops.fusedjd.combine.default, ([J], torch.ones(2, 4), [5, 5])),
        "combine-weights-rank": (torch.ops.fusedjd.combine.default, ([J], torch.ones(3), [10])),
        "combine-weights-dtype": (torch.ops.fusedjd.combine.default, ([J], torch.ones(1, 3, dtype=torch.long), [10])),
        "loop-G-square": (torch.ops.fusedjd.pcgrad_loop.default, (torch.zeros(1, 3, 2), L(1, 3, 2))),
        "loop-G-dtype": (torch.ops.fusedjd.pcgrad_loop.default, (G.half(), L(1, 3, 2))),
        "loop-perms-shape": (torch.ops.fusedjd.pcgrad_loop.default, (G, L(1, 3, 3))),
        "loop-perms-dtype": (torch.ops.fusedjd.pcgrad_loop.default, (G, L(1, 3, 2).int())),
        "gradvac-targets-dtype": (torch.ops.fusedjd.gradvac_loop.default,
                                  (G, L(1, 3, 2), torch.zeros(1, 3, 3, dtype=torch.float64), 0.5, 1e-8)),
        "gradvac-targets-shape": (torch.ops.fusedjd.gradvac_loop.default, (G, L(1, 3, 2), torch.zeros(1, 3), 0.5, 0.0)),
        "gradvac-targets-strided": (torch.ops.fusedjd.gradvac_loop.default,
                                    (G, L(1, 3, 2), torch.zeros(1, 3, 3).transpose(1, 2), 0.5, 0.0)),
        "gradvac-beta": (torch.ops.fusedjd.gradvac_loop.default, (G, L(1, 3, 2), torch.zeros(1, 3, 3), 1.5, 0.0)),
        "gradvac-eps": (torch.ops.fusedjd.gradvac_loop.default, (G, L(1, 3, 2), torch.zeros(1, 3, 3), 0.5, -1.0)),
        "gradvac-two-faults": (torch.ops.fusedjd.gradvac_loop.default,  # the first one checked is named
                               (G.half(), L(1, 3, 2), torch.zeros(1, 3, 3), 0.5, 0.0)),
        "gramian-uint16": (torch.ops.fusedjd.gramian.default, ([J.to(torch.uint16)], [10])),
        "moco-Y-shape": (moco, ([J], torch.zeros(3, 9), torch.ones(3), step, *h)),
        "moco-Y-dtype": (moco, ([J], torch.zeros(3, 10, dtype=torch.float64), torch.ones(3), step, *h)),
        "moco-Y-strided": (moco, ([J], torch.zeros(10, 3).T, torch.ones(3), step, *h)),
        "moco-lam-length": (moco, ([J], torch.zeros(3, 10), torch.ones(4), step, *h)),
        "moco-lam-dtype": (moco, ([J], torch.zeros(3, 10), torch.ones(3, dtype=torch.float64), step, *h)),
        "moco-step-dtype": (moco, ([J], torch.zeros(3, 10), torch.ones(3), torch.zeros(()), *h)),
        "list-empty": (torch.ops.fusedjd.combine.default, ([], torch.ones(1, 3), [0])),
        "list-dtype": (torch.ops.fusedjd.gramian.default, ([J, J.double()], [20])),
        "list-rows": (torch.ops.fusedjd.combine.default, ([J, J[:2]], torch.ones(1, 3), [20])),
        "list-rank": (torch.ops.fusedjd.gramian.default, ([J, J[0]], [20])),
        "moco-Y-list-width": (moco, ([J, J], torch.zeros(3, 10), torch.ones(3), step, *h)),
        "aggregate-no-targets": (torch.ops.fusedjd.aggregate.default, ([J], [10], None, 0.5, 0.0, False)),
        "aggregate-targets-shape": (torch.ops.fusedjd.aggregate.default,
                                    ([J], [10], torch.zeros(1, 3, 2), 0.5, 0.0, False)),
        "aggregate-sizes": (torch.ops.fusedjd.aggregate.default, ([J], [9], None, 0.0, 0.0, True)),
        "moco-gram-shape": (moco, ([J], torch.zeros(3, 10), torch.ones(3), step, *h, torch.zeros(3, 4))),
        "moco-gram-dtype": (moco, ([J], torch.zeros(3, 10), torch.ones(3), step, *h, torch.zeros(3, 3).double())),
        "moco-gramian-Y-shape": (torch.ops.fusedjd.moco_gramian.default, ([J], torch.zeros(3, 9), step, 0.5, 0.5)),
        "moco-gramian-step-dtype": (torch.ops.fusedjd.moco_gramian.default,
                                    ([J], torch.zeros(3, 10), torch.zeros(()), 0.5, 0.5)),
        "moco-step-rank": (moco, ([J], torch.zeros(3, 10), torch.ones(3), L(1), *h)),
        "mgda-G-square": (torch.ops.fusedjd.mgda.default, (torch.zeros(3, 2), 1e-3, 10)),
        "mgda-G-dtype": (torch.ops.fusedjd.mgda.default, (G[0].long(), 1e-3, 10)),
        "mgda-epsilon": (torch.ops.fusedjd.mgda.default, (G[0], 0.0, 10)),
        "mgda-max-iters": (torch.ops.fusedjd.mgda.default, (G[0], 1e-3, 0)),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_fake_kernels_refuse_with_the_eager_message(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args = _bad_calls()[name]
    with pytest.raises(RuntimeError) as eager:
        op(*args)
    mode = FakeTensorMode()
    fake = lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    fake_args = [[fake(x) for x in a] if isinstance(a, list) else fake(a) for a in args]
    with mode, pytest.raises(RuntimeError) as fake:
        op(*fake_args)
    assert str(fake.value) == str(eager.value).split("\n")[0]
    assert str(eager.value).startswith("fusedjd: `")


# ---- threads --------------------------------------------------------------------------------


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU core: nothing to share the loops with")
def test_library_is_built_with_openmp():
    """fusedjd's own at::parallel_for loops run on every thread torch is given only when the
    library itself is compiled with OpenMP (at::parallel_for is a header template): otherwise they
    run on one thread, whatever torch's setting."""
    assert fusedjd.build_info()["openmp"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(7, 3 * 16384 + 77, generator=gen).to(dtype)
    sizes = [5000, 30001, 0, J.shape[1] - 35001]
    W = torch.randn(4, 7, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in [1, 2]:
            torch.set_num_threads(t)
            Y = torch.zeros_like(J)
            lam = torch.full((7,), 1 / 7, dtype=ops.acc_dtype(dtype))
            step = torch.zeros((), dtype=torch.long)
            results.append([ops.gramian(J, sizes), ops.combine(J, W, sizes),
                            *ops.moco_step(J, Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.0, False), Y])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_combine_rounds_like_torch(dtype):
    """The vectorized half-type output rounding is torch's: nearest even, NaN and infinities kept,
    overflow to infinity; here m = 1, so each output is one float32 product, rounded once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen) * torch.logspace(-6, 6, 1000)
    x[::97] = float("nan")
    x[5], x[6], x[7] = float("inf"), -float("inf"), -0.0
    x = x.to(dtype)
    for w in [1.0, 1 / 3, -7.25, 1e4]:
        got = ops.combine(x.view(1, -1), torch.tensor([[w]]), [x.numel()])
        expected = (x.float() * torch.tensor(w, dtype=torch.float32)).to(dtype)
        # values equal (the sum starts at +0, so -0 comes out as +0, which compares equal)
        assert torch.equal(got[~expected.isnan()], expected[~expected.isnan()])
        assert torch.equal(got.isnan(), expected.isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_moco_step_with_a_given_gramian(device, dtype):
    """moco_gramian is the step's first pass: handing its result back to moco_step gives the step
    that computes it itself (bit for bit in float64, where the Gramian is not rounded on the way),
    and moco_gramian writes nothing."""
    gen = torch.Generator().manual_seed(4)
    m, n = 5, 3001
    acc = ops.acc_dtype(dtype)
    states = [(torch.zeros(m, n, dtype=dtype, device=device), torch.full((m,), 0.2, dtype=acc, device=device),
               torch.zeros((), dtype=torch.long, device=device)) for _ in range(2)]
    h = (0.6, 0.4, 0.7, 0.3, 0.1, True)
    for _ in range(4):
        J = torch.randn(m, n, generator=gen).to(dtype).to(device)
        blocks = [J[:, :1000], J[:, 1000:]]
        (Y1, l1, s1), (Y2, l2, s2) = states
        before = Y2.clone(), s2.clone()
        G = ops.moco_gramian(blocks, Y2, s2, h[0], h[1])
        assert torch.equal(Y2, before[0]) and torch.equal(s2, before[1])
        w1, o1 = ops.moco_step(J, Y1, l1, s1, *h)
        w2, o2 = ops.moco_step(blocks, Y2, l2, s2, *h, gram=G)
        if dtype == torch.float64:
            assert torch.equal(w1, w2) and torch.equal(o1, o2) and torch.equal(Y1, Y2)
        else:
            assert rel_err(w2, w1) < 1e-5 and rel_err(o2, o1) < 1e-2 and torch.equal(Y1, Y2)
        assert int(s1) == int(s2)
    bad = G.clone()
    bad[0, 1] = float("nan")
    saved = [t.clone() for t in states[1]]
    w, o = ops.moco_step(blocks, *states[1], *h, gram=bad)
    assert torch.isnan(w).all() and torch.isnan(o).all()
    assert all(torch.equal(a, b) for a, b in zip(states[1], saved))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pcgrad", [False, True])
def test_aggregate_is_the_ops_in_turn(device, dtype, pcgrad):
    """ops.aggregate gives, bit for bit, what draw_perms, gramian, the loop and combine give in
    turn, draws and targets included."""
    gen = torch.Generator().manual_seed(9)
    J = torch.randn(5, 3001, generator=gen).to(dtype).to(device)
    blocks, sizes = [J[:, :1000], J[:, 1000:]], [700, 0, 2301]
    acc = ops.acc_dtype(dtype)
    T1 = None if pcgrad else torch.rand(3, 5, 5, generator=gen).to(acc).to(device)
    T2 = None if pcgrad else T1.clone()
    torch.manual_seed(4)
    out, W = ops.aggregate(blocks, sizes, T1, 0.3, 1e-8, pcgrad)
    after = torch.rand(1)
    torch.manual_seed(4)
    G = ops.gramian(blocks, sizes)
    perms = ops.draw_perms(3, 5, pcgrad, device)
    W2 = ops.pcgrad_loop(G, perms) if pcgrad else ops.gradvac_loop(G, perms, T2, 0.3, 1e-8)
    assert torch.equal(W, W2) and torch.equal(out, ops.combine(blocks, W2, sizes))
    assert pcgrad or torch.equal(T1, T2)
    assert torch.equal(torch.rand(1), after)



def test_device_mismatch_message_names_both_tensors():
    """The device check's wording (the kernels' common.h FUSEDJD_CHECK_ON_J and the fake kernels'
    _check_same_device): run here with a meta tensor, which the dispatcher sends to the fake kernel;
    tests/test_cuda.py checks the CUDA kernel's own message on a GPU."""
    J = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match=r"^fusedjd: `weights` is on meta but `J` is on cpu; all tensors must be "
                                           r"on the same device$"):
        ops.combine(J, torch.ones(1, 3, device="meta"), [10])
    with pytest.raises(RuntimeError, match=r"`Y` is on meta but `J` is on cpu"):
        ops.moco_step(J, torch.zeros(3, 10, device="meta"), torch.ones(3), torch.zeros((), dtype=torch.long),
                      0.5, 0.5, 0.1, 0.5, 0.0, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, m", [(1, 1), (1, 2), (3, 5), (2, 40)])
def test_draw_perms_device_gives_orders_of_the_other_rows(device, k, m):
    """draws="device": every order visits each other row exactly once, drawn from the device's own
    generator (the CPU generator is left alone), and successive draws differ."""
    cpu_state = torch.get_rng_state()
    perms = ops.draw_perms_device(k, m, device)
    if device == "cuda":
        assert torch.equal(torch.get_rng_state(), cpu_state)
    assert perms.shape == (k, m, max(m - 1, 0)) and perms.dtype == torch.long and perms.device.type == device
    P = perms.cpu()
    for g in range(k):
        for i in range(m):
            assert sorted(P[g, i].tolist()) == [j for j in range(m) if j != i]
    if m >= 5:
        assert not torch.equal(ops.draw_perms_device(k, m, device).cpu(), P)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pcgrad", [False, True])
def test_aggregate_takes_given_orders(device, pcgrad):
    """ops.aggregate(..., perms=P) runs the loop with P and draws nothing."""
    gen = torch.Generator().manual_seed(10)
    J = torch.randn(4, 501, generator=gen).to(device)
    P = ops.draw_perms_device(2, 4, device)
    T1 = None if pcgrad else torch.zeros(2, 4, 4, device=device)
    T2 = None if pcgrad else T1.clone()
    rng = torch.get_rng_state()
    out, W = ops.aggregate([J], [200, 301], T1, 0.5, 1e-8, pcgrad, P)
    assert torch.equal(torch.get_rng_state(), rng)
    G = ops.gramian(J, [200, 301])
    W2 = ops.pcgrad_loop(G, P) if pcgrad else ops.gradvac_loop(G, P, T2, 0.5, 1e-8)
    assert torch.equal(W, W2) and torch.equal(out, ops.combine(J, W2, [200, 301]))
    assert pcgrad or torch.equal(T1, T2)


def test_float8_is_refused_by_name_eager_and_traced():
    """A float8 J is refused by the kernels' check and the fake kernel's alike, naming the block."""
    J = torch.randn(3, 10).to(torch.float8_e4m3fn)
    message = r"`J\[1\]` must be float16, bfloat16, float32 or float64, got Float8_e4m3fn"
    for x in (J, J.to("meta")):
        with pytest.raises(RuntimeError, match=message):
            ops.gramian([x.float().to(x.device), x], [20])


class _Recorder(torch.overrides.TorchFunctionMode):
    """A torch-function mode that records the functions it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def _moco_state(m, n, dtype=torch.float32):
    acc = ops.acc_dtype(dtype)
    return [torch.randn(m, n).to(dtype), torch.full((m,), 1.0 / m, dtype=acc), torch.tensor(3)]


@pytest.mark.parametrize("pcgrad", [False, True])
def test_direct_entry_points_equal_torch_ops(pcgrad):
    """ops.aggregate and ops.moco_step enter the dispatcher through fusedjd._C's typed bindings:
    bit for bit what torch.ops gives, state and draws included."""
    gen = torch.Generator().manual_seed(11)
    J = torch.randn(6, 2003, generator=gen)
    blocks, sizes = [J[:, :1000], J[:, 1000:]], [500, 1503]
    T1 = None if pcgrad else torch.rand(2, 6, 6, generator=gen)
    T2 = None if pcgrad else T1.clone()
    torch.manual_seed(5)
    got = ops.aggregate(blocks, sizes, T1, 0.3, 1e-8, pcgrad)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    want = torch.ops.fusedjd.aggregate.default(blocks, sizes, T2, 0.3, 1e-8, pcgrad, None)
    assert torch.equal(torch.get_rng_state(), after)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and (pcgrad or torch.equal(T1, T2))
    torch.manual_seed(0)
    s1, s2 = _moco_state(6, 2003), None
    s2 = [t.clone() for t in s1]
    got = ops.moco_step(blocks, *s1, 0.5, 0.5, 0.1, 0.5, 0.01, pcgrad)
    want = torch.ops.fusedjd.moco_step.default(blocks, *s2, 0.5, 0.5, 0.1, 0.5, 0.01, pcgrad, None)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_torch_function_modes_see_every_op():
    """Under a torch-function mode the ops go through torch.ops (which the mode sees), in the
    classes' calls as in the ops module's."""
    J = torch.randn(3, 50)
    with _Recorder() as rec:
        fusedjd.GradVac()(J)
        fusedjd.PCGrad()(J)
        fusedjd.MoCo()(J)
        ops.aggregate(J, [50], None, 0.0, 0.0, True)
    names = [str(f) for f in rec.seen]
    assert names.count("fusedjd.aggregate.default") == 3 and names.count("fusedjd.moco_step.default") == 1


def test_dispatch_modes_see_the_direct_entry_points():
    """The typed entry points call the op through the dispatcher: a torch-dispatch mode (the
    profiler's and FakeTensor's mechanism) sees every op a class calls."""
    J = torch.randn(3, 50)
    with DispatchRecorder() as rec:
        out = fusedjd.GradVac()(J)
        fusedjd.MoCo()(J)
        ops.gramian(J, [50])
        ops.combine(J, torch.ones(1, 3), [50])
    assert out.shape == (50,)
    for name in ["fusedjd.aggregate.default", "fusedjd.moco_step.default", "fusedjd.gramian.default",
                 "fusedjd.combine.default"]:
        assert name in rec.seen, (name, rec.seen)


@pytest.mark.parametrize("entry", ["ops", "torch.ops"])
def test_refused_aggregate_draws_and_writes_nothing(entry):
    """A refused aggregate (targets of the wrong shape, a bad beta, orders of the wrong shape)
    leaves the targets and the default generator as they were."""
    J = torch.randn(4, 30)
    call = ops.aggregate if entry == "ops" else torch.ops.fusedjd.aggregate.default
    for T, beta, perms, message in [
        (torch.rand(1, 4, 3), 0.5, None, r"`targets` must have the shape of `G` \[1, 4, 4\], got \[1, 4, 3\]"),
        (torch.rand(1, 4, 4), 1.5, None, r"`beta` must be in \[0, 1\], got 1.5"),
        (torch.rand(1, 4, 4), 0.5, torch.zeros(1, 4, 2, dtype=torch.long), r"`perms` must have shape"),
    ]:
        saved, rng = T.clone(), torch.get_rng_state()
        with pytest.raises(RuntimeError, match=message):
            call([J], [30], T, beta, 0.0, False, perms)
        assert torch.equal(T, saved) and torch.equal(torch.get_rng_state(), rng)
