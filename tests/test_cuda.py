"""CUDA-only checks: kernels equal the CPU kernels; CUDA graphs (capture, replay on new data
against eager calls, the refusal of host draws, device draws valid and fresh); no host syncs;
kernel launches and host-to-device copies per step; compile.

Every other test file also runs its device-parametrized cases on CUDA when a GPU is
present. These tests skip (with the reason shown by ``pytest -rs``) when there is none.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest
import torch
from torchjd import aggregation as ta

import fusedjd
from fusedjd import ops, reference

from fusedjd.reference import TOLERANCE, rel_err

from conftest import group_sizes, requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def test_gpu_build_has_cuda_kernels():
    """A GPU is visible: a build without CUDA kernels is a broken install, not a skip."""
    assert fusedjd.build_info()["cuda"], f"fusedjd was built without CUDA kernels: {fusedjd.build_info()}"
    assert ops.has_cuda_kernels()


def test_draw_perms_on_the_gpu_without_a_host_sync():
    torch.manual_seed(4)
    expected = ops.draw_perms(3, 5, pcgrad=False)
    torch.manual_seed(4)
    with torch.cuda.stream(torch.cuda.Stream()):
        got = ops.draw_perms(3, 5, pcgrad=False, device="cuda")
    torch.cuda.synchronize()
    assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 999, 1), (2, 4097, 3), (3, 1001, 1), (8, 100003, 5),
                                   (16, 33333, 1), (17, 5001, 2), (32, 20001, 4), (64, 3001, 1), (130, 501, 2),
                                   (8, 50000, 1000)])
def test_gramian_and_combine_equal_cpu(dtype, m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    J = torch.randn(m, n, generator=gen).to(dtype)
    sizes = group_sizes(n, k, gen)
    G_cpu, G_gpu = ops.gramian(J, sizes), ops.gramian(J.cuda(), sizes)
    assert rel_err(G_gpu, G_cpu) < TOLERANCE["combine"][dtype]
    W = torch.randn(k, m, generator=gen)
    assert rel_err(ops.combine(J.cuda(), W.cuda(), sizes), ops.combine(J, W, sizes)) < TOLERANCE["combine"][dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_and_strided_views(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(9, 40003, generator=gen).to(dtype).cuda()
    for J in [base[1:, 1:], base[:, 3:40002], base[:5, ::2], base[2:7].T.contiguous().T]:
        Jc = J.cpu()
        sizes = [J.shape[1] // 2, J.shape[1] - J.shape[1] // 2]
        assert rel_err(ops.gramian(J, sizes), ops.gramian(Jc, sizes)) < TOLERANCE["combine"][dtype]
        W = torch.randn(2, J.shape[0], generator=gen)
        assert rel_err(ops.combine(J, W.cuda(), sizes), ops.combine(Jc, W, sizes)) < TOLERANCE["combine"][dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k", [(1, 1), (2, 7), (8, 1000), (32, 3), (256, 1)])
def test_loops_equal_cpu(dtype, m, k):
    gen = torch.Generator().manual_seed(m * k)
    A = torch.randn(k, m, 2 * m + 3, generator=gen, dtype=torch.float64)
    G = (A @ A.transpose(1, 2)).to(dtype)
    T_cpu = (torch.rand(k, m, m, generator=gen, dtype=dtype) - 0.5)
    T_gpu = T_cpu.cuda()
    perms = ops.draw_perms(k, m, pcgrad=False)
    W_cpu = ops.gradvac_loop(G, perms, T_cpu, 0.4, 1e-8)
    W_gpu = ops.gradvac_loop(G.cuda(), perms.cuda(), T_gpu, 0.4, 1e-8)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(W_gpu, W_cpu) < tol and rel_err(T_gpu, T_cpu) < tol
    perms = ops.draw_perms(k, m, pcgrad=True)
    assert rel_err(ops.pcgrad_loop(G.cuda(), perms.cuda()), ops.pcgrad_loop(G, perms)) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(1, 9), (3, 4099), (8, 100001), (40, 777), (70, 301)])
@pytest.mark.parametrize("projection", [False, True])
def test_moco_step_equals_cpu(dtype, m, n, projection):
    gen = torch.Generator().manual_seed(m + n)
    states = []
    for dev in ["cpu", "cuda"]:
        Y = torch.zeros(m, n, dtype=dtype, device=dev)
        lam = torch.full((m,), 1.0 / m, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=dev)
        states.append((Y, lam, torch.zeros((), dtype=torch.long, device=dev)))
    for _ in range(3):
        J = torch.randn(m, n, generator=gen).to(dtype)
        outs = [ops.moco_step(J.to(Y.device), Y, lam, step, 0.5, 0.5, 0.3, 0.5, 0.1, projection)
                for Y, lam, step in states]
        tol = max(TOLERANCE["combine"][dtype], 1e-10)
        assert rel_err(outs[1][0], outs[0][0]) < 10 * tol and rel_err(outs[1][1], outs[0][1]) < 10 * tol
        assert rel_err(states[1][0], states[0][0]) < tol
        assert torch.equal(states[1][2].cpu(), states[0][2])


def test_nonfinite_on_cuda_keeps_state():
    agg = fusedjd.MoCo()
    J = torch.randn(4, 1000, device="cuda")
    agg(J)
    saved = {k: v.clone() for k, v in agg.state_dict().items()}
    J[2, 5] = float("nan")
    assert torch.isnan(agg(J)).all()
    for k, v in agg.state_dict().items():
        assert torch.equal(v, saved[k])
    gv = fusedjd.GradVac()
    gv(torch.randn(4, 1000, device="cuda"))
    saved = gv.gramian_weighting._targets.clone()
    assert not torch.isfinite(gv(J)).all()
    assert torch.equal(gv.gramian_weighting._targets, saved)


@pytest.mark.parametrize("make", [fusedjd.GradVac, fusedjd.PCGrad, lambda: fusedjd.GroupedGradVac([500, 300, 200]),
                                  fusedjd.MoCo, fusedjd.MoCoWeighting, fusedjd.GradVacWeighting])
def test_no_host_sync_in_forward(make):
    agg = make()
    gramian = isinstance(agg, (fusedjd.GradVacWeighting,))
    x = torch.randn(5, 1000, device="cuda")
    x = x @ x.T if gramian else x
    agg(x)  # state allocation happens here, outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            agg(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_work_table_made_inside_capture_then_eager():
    """A work table made inside a CUDA-graph capture is written only at replay: it must outlive
    the capture, and a later eager call must make its own (work_table.cu)."""
    gen = torch.Generator().manual_seed(21)
    J = torch.randn(8, 50001, generator=gen).cuda()
    sizes = [12347, 0, 37654]  # a grouping no other test uses
    ref = ops.gramian(J.cpu(), sizes)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G_captured = ops.gramian(J, sizes)
    G_eager = ops.gramian(J, sizes)
    torch.cuda.synchronize()
    assert rel_err(G_eager, ref) < 1e-5
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(G_captured, ref) < 1e-5


def test_work_table_on_one_stream_then_another():
    """A table written by a kernel on one stream is never read from another stream that did not
    wait for it: the cache keys tables by stream (work_table.cu)."""
    gen = torch.Generator().manual_seed(22)
    J = torch.randn(8, 50001, generator=gen).cuda()
    sizes = [777, 49224]  # a grouping no other test uses
    ref = ops.gramian(J.cpu(), sizes)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    s1.wait_stream(torch.cuda.current_stream())
    s2.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s1):
        torch.cuda._sleep(10_000_000)  # keep s1 busy, so its table copy is still pending
        G1 = ops.gramian(J, sizes)
    with torch.cuda.stream(s2):
        G2 = ops.gramian(J, sizes)
    torch.cuda.synchronize()
    assert rel_err(G1, ref) < 1e-5 and rel_err(G2, ref) < 1e-5


def test_cuda_graph_capture_of_ops_and_moco():
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(6, 30001, generator=gen).cuda()
    sizes = [10000, 20001]
    perms = ops.draw_perms(2, 6, pcgrad=False).cuda()
    targets = torch.zeros(2, 6, 6, device="cuda")
    agg = fusedjd.MoCo()
    agg(J)  # allocate the state and warm up
    ops.gramian(J, sizes)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream
        G = ops.gramian(J, sizes)
        ops.combine(J, ops.gradvac_loop(G, perms, targets.clone(), 0.5, 1e-8), sizes)
    torch.cuda.current_stream().wait_stream(side)
    state0 = {k: v.clone() for k, v in agg.state_dict().items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G = ops.gramian(J, sizes)
        W = ops.gradvac_loop(G, perms, targets, 0.5, 1e-8)
        out = ops.combine(J, W, sizes)
        moco_out = agg(J)
    # replay from fresh targets / state and compare with eager
    targets.zero_()
    agg.load_state_dict(state0)
    graph.replay()
    torch.cuda.synchronize()
    t_eager = torch.zeros(2, 6, 6, device="cuda")
    W_eager = ops.gradvac_loop(ops.gramian(J, sizes), perms, t_eager, 0.5, 1e-8)
    assert torch.equal(out, ops.combine(J, W_eager, sizes)) and torch.equal(targets, t_eager)
    eager = fusedjd.MoCo().cuda()  # (its state on the GPU: a state on another device would be reset)
    eager.load_state_dict(state0)
    assert torch.equal(moco_out, eager(J))
    graph.replay()  # the in-place state keeps advancing
    torch.cuda.synchronize()
    assert int(agg.step) == int(state0["weighting._step"]) + 2


def test_compile_reduce_overhead():
    torch._dynamo.reset()
    agg, ref = fusedjd.MoCo(), fusedjd.MoCo()
    perms = ops.draw_perms(1, 4, pcgrad=False).cuda()

    def step(J, targets):
        G = ops.gramian(J, [J.shape[1]])
        W = ops.gradvac_loop(G, perms, targets, 0.5, 1e-8)
        return ops.combine(J, W, [J.shape[1]]) + agg(J)

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    t1, t2 = torch.zeros(1, 4, 4, device="cuda"), torch.zeros(1, 4, 4, device="cuda")
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        J = torch.randn(4, 5000, generator=gen).cuda()
        got = compiled(J, t1).clone()
        G = ops.gramian(J, [5000])
        expected = ops.combine(J, ops.gradvac_loop(G, perms, t2, 0.5, 1e-8), [5000]) + ref(J)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("m", [2, 5, 8])
def test_classes_on_cuda_match_torchjd(m):
    gen = torch.Generator().manual_seed(m)
    Js = [torch.randn(m, 4097, generator=gen) for _ in range(20)]
    for ours, theirs in [(fusedjd.GradVac(), ta.GradVac()), (fusedjd.PCGrad(), ta.PCGrad())]:
        torch.manual_seed(3)
        got = [ours(J.cuda()).cpu() for J in Js]
        torch.manual_seed(3)
        expected = [theirs(J) for J in Js]
        for g, e in zip(got, expected):
            assert rel_err(g, e) < 1e-4


def test_state_follows_to_and_resets_on_device_change():
    J = torch.randn(3, 100)
    for make in [fusedjd.GradVac, fusedjd.MoCo]:
        agg = make()
        torch.manual_seed(0)
        agg(J)
        agg(J)
        agg.cuda()  # .to() moves the state: the run continues on the GPU
        twin = make()
        torch.manual_seed(0)
        twin(J)
        twin(J)
        torch.manual_seed(1)
        got = agg(J.cuda())
        torch.manual_seed(1)
        assert rel_err(got, twin(J)) < 1e-5
        fresh = make()  # a device change without .to() resets the state
        torch.manual_seed(0)
        fresh(J)
        torch.manual_seed(2)
        got = fresh(J.cuda())
        torch.manual_seed(2)
        assert rel_err(got, make()(J)) < 1e-5


def test_mixed_devices_are_refused():
    """The kernels' message (common.h's FUSEDJD_CHECK_ON_J), as the fake kernels word it
    (tests/test_ops.py checks that wording on the CPU with a meta tensor)."""
    J = torch.randn(3, 10, device="cuda")
    with pytest.raises(RuntimeError, match=r"`weights` is on cpu but `J` is on cuda:0"):
        ops.combine(J, torch.ones(1, 3), [10])
    with pytest.raises(RuntimeError, match=r"`Y` is on cpu but `J` is on cuda:0"):
        ops.moco_step(J, torch.zeros(3, 10), torch.ones(3, device="cuda"), torch.zeros((), dtype=torch.long,
                      device="cuda"), 0.5, 0.5, 0.1, 0.5, 0.0, False)


def _drawing(kind: str, sizes: list[int] | None = None, **kw):
    """One of the five classes that draw visit orders (the weightings take the Gramian)."""
    return {"GradVac": lambda: fusedjd.GradVac(**kw), "PCGrad": lambda: fusedjd.PCGrad(**kw),
            "GroupedGradVac": lambda: fusedjd.GroupedGradVac(sizes or [700, 300], **kw),
            "GradVacWeighting": lambda: fusedjd.GradVacWeighting(**kw),
            "PCGradWeighting": lambda: fusedjd.PCGradWeighting(**kw)}[kind]()


def _input_of(kind: str, J: torch.Tensor) -> torch.Tensor:
    return J @ J.T if kind.endswith("Weighting") else J


DRAWING = ["GradVac", "PCGrad", "GroupedGradVac", "GradVacWeighting", "PCGradWeighting"]


@pytest.mark.parametrize("kind", DRAWING + ["ops.aggregate"])
def test_capture_of_host_draws_is_refused(kind):
    """torchjd's draws are made on the host: a captured graph would replay the orders drawn at
    capture forever, so the capture is refused, naming the way out (ops.aggregate without orders
    too)."""
    if kind == "ops.aggregate":
        agg = lambda J: ops.aggregate(J, [600, 400], None, 0.0, 0.0, True)  # noqa: E731
    else:
        agg = _drawing(kind)
    J = _input_of(kind, torch.randn(5, 1000, device="cuda"))
    agg(J)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        agg(J)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match='draws="device"'):
        with torch.cuda.graph(graph):
            agg(J)


@pytest.mark.parametrize("kind", DRAWING)
def test_capture_with_device_draws_replays_new_orders(kind):
    """draws="device": the orders come from the CUDA generator, registered with the graph, so each
    replay draws new ones, as the eager calls after the same torch.cuda.manual_seed do."""
    gen = torch.Generator().manual_seed(3)
    agg, twin = _drawing(kind, draws="device"), _drawing(kind, draws="device").cuda()
    J = _input_of(kind, torch.randn(6, 1000, generator=gen).cuda())
    graph, out = _captured(lambda: agg(J))
    twin.load_state_dict(agg.state_dict())  # (the capture ran no kernel: the warm-up's state)
    xs = [_input_of(kind, torch.randn(6, 1000, generator=gen).cuda()) for _ in range(3)]
    torch.cuda.manual_seed(11)
    got = []
    for x in xs:
        J.copy_(x)
        graph.replay()
        got.append(out.clone())
    torch.cuda.manual_seed(11)
    expected = [twin(x) for x in xs]
    torch.cuda.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    torch.cuda.manual_seed(12)
    J.copy_(xs[0])
    graph.replay()
    again = out.clone()
    J.copy_(xs[0])
    graph.replay()
    assert not torch.equal(again, out) or kind.startswith("PCGrad"), "the replays reuse one visit order"


def test_fallback_gramian_keeps_float32_accuracy_under_tf32():
    """Beyond 128 rows the CUDA Gramian uses matrix products: with TF32 allowed
    (set_float32_matmul_precision("high")) they run in float64, so the contract's 1e-5 holds."""
    gen = torch.Generator().manual_seed(129)
    J = torch.randn(129, 20001, generator=gen)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        G = ops.gramian(J.cuda(), [7001, 13000])
        Y = torch.zeros(129, 20001, device="cuda")
        step = torch.zeros((), dtype=torch.long, device="cuda")
        M = ops.moco_gramian(J.cuda(), Y, step, 0.5, 0.5)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert rel_err(G, reference.gramian(J, [7001, 13000])) < TOLERANCE["gramian"][torch.float32]
    assert rel_err(M, reference.gramian(0.5 * J.double(), [20001])[0]) < TOLERANCE["gramian"][torch.float32]


@pytest.mark.parametrize("m", [1, 5, 40, 130])
def test_dual_cone_equals_cpu(m):
    gen = torch.Generator().manual_seed(m)
    J = torch.randn(m, max(1, m // 2), generator=gen, dtype=torch.float64)
    G = J @ J.T / (J.norm() ** 2) + 1e-4 * torch.eye(m, dtype=torch.float64)
    U = torch.randn(m + 3, m, generator=gen, dtype=torch.float64)
    assert rel_err(ops.dual_cone(U.cuda(), G.cuda()).cpu(), ops.dual_cone(U, G)) < 1e-12
    assert rel_err(fusedjd.UPGrad()(J.cuda()).cpu(), fusedjd.UPGrad()(J)) < 1e-10


@pytest.mark.parametrize("make", [fusedjd.UPGrad, fusedjd.DualProj, fusedjd.MGDA])
def test_upgrad_step_through_jac_to_grad_without_a_host_sync(make):
    """A training step with fusedjd's UPGrad (and DualProj, MGDA) on CUDA: the Gramian, the
    projector (MGDA's Frank-Wolfe loop) and the combination without host synchronisation,
    CUDA-graph capturable, equal to the CPU step."""
    p = torch.zeros(3, 700, device="cuda", requires_grad=True)
    jac = torch.randn(6, 3, 700, device="cuda")
    agg = make()
    p.jac = jac.clone()
    fusedjd.jac_to_grad([p], agg)  # (once outside: lazy initialisations)
    p.grad = None
    p.jac = jac.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedjd.jac_to_grad([p], agg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    q = torch.zeros(3, 700, requires_grad=True)
    q.jac = jac.cpu()
    fusedjd.jac_to_grad([q], make())
    assert rel_err(p.grad.cpu(), q.grad) < 1e-5
    J = jac.reshape(6, -1)
    graph, out = _captured(lambda: agg(J))
    J.mul_(2.0)
    graph.replay()
    assert rel_err(out, agg(J)) < 1e-6


# ---- CUDA graphs on new data, device draws, host syncs, launches per step --------------------------

def _captured(fn):
    """fn() captured in a CUDA graph after two warm-up calls on a side stream (the capture runs no
    kernel: the state it leaves is the warm-up's). Returns the graph and the outputs of the capture,
    which every replay overwrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _assert_close_all(got, expected, tol):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert rel_err(a, b) < tol, f"tensor {i} of {len(got)}: relative error {rel_err(a, b):.1e}"


def _state(module) -> list[torch.Tensor]:
    return [v for v in module.state_dict().values() if isinstance(v, torch.Tensor)]


def _randn(gen, m, n, dtype=torch.float32, scale=1.0):
    return (torch.randn(m, n, generator=gen) * scale).to(dtype).cuda()


@pytest.mark.parametrize("dtype,m,blocks,sizes,pcgrad", [
    *[(dtype, 8, [300001, 700000], [250000, 0, 750001], False) for dtype in DTYPES],
    (torch.float32, 20, [50000], [50] * 1000, False),
    (torch.float32, 64, [4099, 5001], [9100], False),
    (torch.float32, 8, [1000001], [400000, 600001], True),
], ids=["float32", "float64", "float16", "bfloat16", "m20-1000-groups", "m64", "pcgrad"])
def test_graph_replay_of_the_op_pipeline_equals_eager(dtype, m, blocks, sizes, pcgrad):
    """gramian -> gradvac_loop (targets in place) or pcgrad_loop -> combine on a list of blocks,
    captured, then replayed on new data written into the captured blocks: the outputs and targets
    equal eager calls from the same targets."""
    gen = torch.Generator().manual_seed(m * 1000 + len(blocks))
    k = len(sizes)
    Js = [_randn(gen, m, b, dtype) for b in blocks]
    perms = ops.draw_perms(k, m, pcgrad=pcgrad).cuda()
    targets = torch.zeros(k, m, m, dtype=ops.acc_dtype(dtype), device="cuda")

    def step(blocks, T):
        G = ops.gramian(blocks, sizes)
        W = ops.pcgrad_loop(G, perms) if pcgrad else ops.gradvac_loop(G, perms, T, 0.5, 1e-8)
        return ops.combine(blocks, W, sizes), W

    graph, out = _captured(lambda: step(Js, targets))
    twin = targets.clone()
    for _ in range(3):
        new = [_randn(gen, m, b, dtype) for b in blocks]
        for J, x in zip(Js, new):
            J.copy_(x)
        graph.replay()
        _assert_close_all([*out, targets], [*step(new, twin), twin], 1e-6)


@pytest.mark.parametrize("dtype,projection,with_gram", [
    (torch.float32, False, False), (torch.float32, True, False), (torch.bfloat16, False, False),
    (torch.float32, False, True)], ids=["softmax", "projection", "bfloat16", "moco_gramian"])
def test_graph_replay_of_moco_step_equals_eager(dtype, projection, with_gram):
    """moco_step (with moco_gramian's Gramian, as sharded MoCo calls it) on its state tensors,
    captured and replayed on new data: outputs and state equal eager steps from the same state."""
    m, n = 8, 1000003
    gen = torch.Generator().manual_seed(m + n)
    J = _randn(gen, m, n, dtype, n**-0.5)
    state = [torch.zeros(m, n, dtype=dtype, device="cuda"),
             torch.full((m,), 1.0 / m, dtype=ops.acc_dtype(dtype), device="cuda"),
             torch.zeros((), dtype=torch.long, device="cuda")]

    def step(J, Y, lam, count):
        gram = ops.moco_gramian(J, Y, count, 0.5, 0.5) if with_gram else None
        return ops.moco_step(J, Y, lam, count, 0.5, 0.5, 0.1, 0.5, 0.1, projection, gram)

    graph, out = _captured(lambda: step(J, *state))
    twin = [t.clone() for t in state]
    for _ in range(3):
        x = _randn(gen, m, n, dtype, n**-0.5)
        J.copy_(x)
        graph.replay()
        _assert_close_all([*out, *state], [*step(x, *twin), *twin], 1e-5)


@pytest.mark.parametrize("pcgrad", [False, True], ids=["GradVac", "PCGrad"])
def test_graph_replay_of_aggregate_with_device_draws_equals_eager(pcgrad):
    """draw_perms_device -> aggregate(perms=...) captured; its replays on new data equal eager calls
    made after the same torch.cuda.manual_seed (a replay advances the CUDA generator as the eager
    draws do)."""
    m, sizes = 8, [300000, 700003]
    gen = torch.Generator().manual_seed(m + 5)
    J = _randn(gen, m, sum(sizes))
    T = None if pcgrad else torch.zeros(2, m, m, device="cuda")

    def step(J, T):
        out = ops.aggregate(J, sizes, T, 0.5, 1e-8, pcgrad, ops.draw_perms_device(2, m, J.device))
        return [*out] + ([] if T is None else [T])

    graph, out = _captured(lambda: step(J, T))
    twin = None if pcgrad else T.clone()
    xs = [_randn(gen, m, sum(sizes)) for _ in range(3)]
    torch.cuda.manual_seed(77)
    got = []
    for x in xs:
        J.copy_(x)
        graph.replay()
        got.append([t.clone() for t in out])
    torch.cuda.manual_seed(77)
    for x, g in zip(xs, got):
        _assert_close_all(g, [t.clone() for t in step(x, twin)], 1e-6)


@pytest.mark.parametrize("make,dtype,m,n", [
    (fusedjd.MoCo, torch.float32, 8, 1000003), (fusedjd.MoCo, torch.bfloat16, 8, 1000003),
    (lambda: fusedjd.MoCo(simplex="projection"), torch.float32, 20, 30001),
    (fusedjd.MoCoWeighting, torch.float32, 8, 200003),
], ids=["MoCo", "MoCo-bfloat16", "MoCo-projection", "MoCoWeighting"])
def test_graph_replay_of_moco_classes_equals_eager(make, dtype, m, n):
    """MoCo and MoCoWeighting captured and replayed on new data: output and state equal an eager
    twin's, started from the same state."""
    gen = torch.Generator().manual_seed(m + n)
    agg, twin = make(), make()
    J = _randn(gen, m, n, dtype, n**-0.5)
    agg(J)  # the state is allocated eagerly, outside the capture
    graph, out = _captured(lambda: agg(J))
    twin.cuda().load_state_dict(agg.state_dict())
    for _ in range(3):
        x = _randn(gen, m, n, dtype, n**-0.5)
        J.copy_(x)
        graph.replay()
        expected = twin(x)
        _assert_close_all([out, *_state(agg)], [expected, *_state(twin)], 1e-5)


def _all_orders(m: int) -> torch.Tensor:
    """Every combination of visit orders at m rows: [((m-1)!)^m, m, m-1]."""
    rows = [list(itertools.permutations([j for j in range(m) if j != i])) for i in range(m)]
    return torch.tensor(list(itertools.product(*rows)), dtype=torch.long)


def _conflicting(gen: torch.Generator, m: int, n: int) -> torch.Tensor:
    """m rows whose pairs all conflict (cosines near -1/(m-1)), of unequal norms, with noise: every
    combination of visit orders gives its own result."""
    B = torch.randn(m, n, generator=gen, dtype=torch.float64)
    B = B / B.norm(dim=1, keepdim=True)
    R = B - B.mean(0, keepdim=True) + 0.15 * torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5
    return (R * torch.tensor([1.0, 2.0, 0.5, 3.0][:m], dtype=torch.float64).view(m, 1)).float()


@pytest.mark.parametrize("kind", DRAWING)
def test_device_draws_are_valid_and_fresh_at_every_replay(kind):
    """m = 4, one J replayed 3 times with draws="device": each replay's result (and GradVac's targets
    after it) is that of one of the (3!)^4 = 1296 combinations of visit orders (brute force: the
    loop run on every combination), and no one combination explains every replay (orders frozen at
    capture would)."""
    m, nb, groups = 4, 1500, 3 if kind == "GroupedGradVac" else 1
    gen = torch.Generator().manual_seed(4242 + groups)
    sizes = [nb] * groups
    J = torch.cat([_conflicting(gen, m, nb) for _ in range(groups)], dim=1).cuda()
    pcgrad, weighting = kind.startswith("PCGrad"), kind.endswith("Weighting")
    # beta = 0 keeps GradVac's targets at 0: every conflicting pair is corrected at every step, so
    # different orders give clearly different results
    agg = _drawing(kind, sizes, draws="device", **({} if pcgrad else {"beta": 0.0}))
    X = _input_of(kind, J)
    agg(X)
    graph, out = _captured(lambda: agg(X))
    targets = lambda: [t for t in _state(agg) if t.dim() == 3][0].clone()  # noqa: E731
    P = _all_orders(m).cuda()
    K = P.shape[0]
    Gs = X.unsqueeze(0).float() if weighting else ops.gramian(J, sizes)
    matches: list[list[set[int]]] = [[] for _ in range(groups)]
    for _ in range(3):
        before = None if pcgrad else targets()
        graph.replay()
        result = out.clone()
        after = None if pcgrad else targets()
        for g in range(groups):
            cols = slice(g * nb, (g + 1) * nb)
            Gk = Gs[g].expand(K, m, m).contiguous()
            if pcgrad:
                W = ops.pcgrad_loop(Gk, P)
            else:
                Tk = before[g].expand(K, m, m).contiguous()
                W = ops.gradvac_loop(Gk, P, Tk, 0.0, agg.eps)
            cand = W.double() if weighting else W.double() @ J[:, cols].double()
            seen = (result if weighting else result[cols]).double().reshape(1, -1)
            err = (cand - seen).norm(dim=1) / seen.norm()
            if not pcgrad:
                err = torch.maximum(err, (Tk.double() - after[g].double()).abs().amax(dim=(1, 2)))
            matches[g].append(set(torch.nonzero(err < 1e-5).flatten().tolist()))
    for g, per_replay in enumerate(matches):
        assert all(per_replay), f"group {g}: a replay matches no combination of visit orders ({per_replay})"
        assert not set.intersection(*per_replay), f"group {g}: one combination explains every replay (frozen orders)"


def _sleep_cycles(seconds: float) -> int:
    """The torch.cuda._sleep argument that keeps the GPU busy for about ``seconds``."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10**7)
    b.record()
    b.synchronize()
    return int(10**7 * seconds * 1e3 / max(a.elapsed_time(b), 1e-3))


@pytest.mark.parametrize("via", ["direct", "jac_to_grad"])
@pytest.mark.parametrize("make", [fusedjd.GradVac, fusedjd.MoCo, fusedjd.UPGrad, fusedjd.MGDA],
                         ids=["GradVac", "MoCo", "UPGrad", "MGDA"])
def test_step_runs_behind_a_busy_gpu_without_a_host_sync(make, via):
    """A step at m = 8, n = 1e6, called directly or through fusedjd.jac_to_grad: no synchronising
    call under set_sync_debug_mode("error"), and with a 300 ms kernel queued first the call returns
    at once, the stream still busy (a call that waited for the GPU would take those 300 ms)."""
    gen = torch.Generator().manual_seed(3)
    agg = make()
    if via == "direct":
        J = _randn(gen, 8, 10**6)
        call = lambda: agg(J)  # noqa: E731
    else:
        params = [torch.zeros(s, device="cuda", requires_grad=True) for s in [(1000, 500), (500,), (499, 1000)]]
        for p in params:
            p.jac = torch.randn(8, *p.shape, generator=gen).cuda()
        call = lambda: fusedjd.jac_to_grad(params, agg, retain_jac=True)  # noqa: E731
    call()  # the state, workspaces and pinned buffers
    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cycles = _sleep_cycles(0.3)
    torch.cuda._sleep(cycles)
    start = time.perf_counter()
    call()
    host = time.perf_counter() - start
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy and host < 0.1, f"the call took {host * 1e3:.1f} ms on the host; stream busy after it: {busy}"


@pytest.mark.parametrize("make,kernels", [(fusedjd.GradVac, 5), (fusedjd.PCGrad, 5), (fusedjd.MoCo, 4)],
                         ids=["GradVac", "PCGrad", "MoCo"])
def test_launches_and_host_to_device_copies_per_step(make, kernels):
    """Device activity per step at m = 8, n = 1e6, in steady state (torch.profiler): at most 5
    kernels for GradVac and PCGrad (the Gramian's two, the loop's two, the combination), 4 for MoCo,
    and at most one host-to-device copy (the visit orders drawn on the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = 5
    J = _randn(torch.Generator().manual_seed(8), 8, 10**6)
    agg = make()
    for _ in range(3):
        agg(J)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            agg(J)
        torch.cuda.synchronize()

    def kind(e) -> str:
        if e.name.startswith("Memcpy"):
            return "HtoD" if "HtoD" in e.name else "memcpy"
        return "memset" if e.name.startswith("Memset") else (getattr(e, "activity_type", None) or "kernel")

    seen = Counter(kind(e) for e in prof.events() if e.device_type == DeviceType.CUDA)
    names = Counter(e.name[:60] for e in prof.events() if e.device_type == DeviceType.CUDA and kind(e) == "kernel")
    assert seen["kernel"] > 0, "the profiler recorded no kernel (no CUDA activity?)"
    assert seen["kernel"] <= kernels * steps and seen["HtoD"] <= steps, f"over {steps} steps: {seen}; kernels {names}"
