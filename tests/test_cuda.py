"""CUDA-only checks: kernels equal the CPU kernels, no host syncs, CUDA graphs, compile.

Every other test file also runs its device-parametrized cases on CUDA when a GPU is
present. These tests skip (with the reason shown by ``pytest -rs``) when there is none.
"""

from __future__ import annotations

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
    eager = fusedjd.MoCo()
    eager.load_state_dict(state0)
    assert torch.equal(moco_out, eager(J))
    graph.replay()  # the in-place state keeps advancing
    torch.cuda.synchronize()
    assert int(agg.step) == int(state0["_step"]) + 2


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


@pytest.mark.parametrize("make", [fusedjd.GradVac, fusedjd.PCGrad, lambda: fusedjd.GroupedGradVac([600, 400])])
def test_capture_of_host_draws_is_refused(make):
    """torchjd's draws are made on the host: a captured graph would replay the orders drawn at
    capture forever, so the capture is refused, naming the way out."""
    agg = make()
    J = torch.randn(5, 1000, device="cuda")
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


@pytest.mark.parametrize("kind", ["GradVac", "PCGrad", "GroupedGradVac"])
def test_capture_with_device_draws_replays_new_orders(kind):
    """draws="device": the orders come from the CUDA generator, registered with the graph, so each
    replay draws new ones, as the eager calls after the same torch.cuda.manual_seed do."""
    make = {"GradVac": lambda: fusedjd.GradVac(draws="device"), "PCGrad": lambda: fusedjd.PCGrad(draws="device"),
            "GroupedGradVac": lambda: fusedjd.GroupedGradVac([700, 300], draws="device")}[kind]
    gen = torch.Generator().manual_seed(3)
    agg, twin = make(), make()
    J = torch.randn(6, 1000, generator=gen).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        agg(J)
    torch.cuda.current_stream().wait_stream(side)
    twin.load_state_dict(agg.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = agg(J)
    twin_state = {k: v.clone() for k, v in twin.state_dict().items()}
    agg.load_state_dict(twin_state)  # the capture ran no kernel: start both from the same state
    xs = [torch.randn(6, 1000, generator=gen).cuda() for _ in range(3)]
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
    assert not torch.equal(again, out) or kind == "PCGrad", "the replays reuse one visit order"


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


@pytest.mark.parametrize("make", [fusedjd.UPGrad, fusedjd.DualProj])
def test_upgrad_step_through_jac_to_grad_without_a_host_sync(make):
    """A training step with fusedjd's UPGrad (and DualProj) on CUDA: the Gramian, the projector and
    the combination without host synchronisation, CUDA-graph capturable, equal to the CPU step."""
    p = torch.zeros(3, 700, device="cuda", requires_grad=True)
    jac = torch.randn(6, 3, 700, device="cuda")
    agg = make()
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
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = agg(J)
    J.mul_(2.0)
    graph.replay()
    assert rel_err(out, agg(J)) < 1e-6
