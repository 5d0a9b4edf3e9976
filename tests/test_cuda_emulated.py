"""The CUDA kernels, executed on the CPU by the SIMT emulator (``tests/simt``, built by
``tests/simt_build.py``), against float64 references.

``torch.ops.fusedjd_simt.*`` are the host functions of ``csrc/cuda/*.cu`` compiled as C++: every
launch runs the kernel's code with one fiber per CUDA thread. Each case runs under two schedule
orders of the threads within a block (forward and reverse; some also seeded random), and the
results must be bit-identical: a missing barrier or a warp-synchronous assumption changes them.
The cases are spread over 1, 7 and 132 emulated multiprocessors, so every grid decomposition is
taken. Blocks always run one after another, so nothing here can show a race between blocks.
These tests never skip: no GPU is needed.

``FUSEDJD_SIMT_FULL=1`` runs the whole grid of shapes (minutes); the default is a subset that
still takes every m, n, dtype and code path once. Cases marked ``asan`` are the ones CI also runs
under AddressSanitizer.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import simt_build
from conftest import group_sizes, matrix
from fusedjd import ops, reference
from fusedjd.reference import TOLERANCE, rel_err

simt_build.load()
EMU = torch.ops.fusedjd_simt
FULL = os.environ.get("FUSEDJD_SIMT_FULL", "0") not in ("", "0")

MS = [1, 2, 3, 8, 16, 17, 32, 33, 64, 129]
NS = [0, 1, 3, 4, 5, 1000, 4099]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SMS = [1, 7, 132]


def _asan(*values, asan=False):
    return pytest.param(*values, marks=pytest.mark.asan) if asan else pytest.param(*values)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of x, so that NaN == NaN and -0.0 != 0.0 in a comparison."""
    x = x.detach().contiguous().reshape(-1)
    return x.view(torch.uint8) if x.numel() else x


def run_schedules(fn, orders=(simt_build.FORWARD, simt_build.REVERSE), sm_count=132, seed=0):
    """Runs fn() once per schedule order and checks that every output (and everything fn mutates,
    which fn returns) is bit-identical across orders. Returns the first run's outputs."""
    results = []
    launches = simt_build.stats()["launches"]
    for order in orders:
        simt_build.configure(order, seed, sm_count)
        out = fn()
        results.append([t.clone() for t in (out if isinstance(out, (tuple, list)) else [out])])
    simt_build.configure()
    for other, order in zip(results[1:], orders[1:]):
        for a, b in zip(results[0], other):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(_bits(a), _bits(b)), f"results change with the schedule order ({order})"
    results[0].append(simt_build.stats()["launches"] - launches)
    return results[0]




# ---- the emulator itself -------------------------------------------------------------------


def test_emulator_library_covers_every_cuda_op():
    # every op with a CUDA kernel (csrc/cuda/*.cu), aggregate (cuda/aggregate.cu) included
    for op in ["gramian", "combine", "gradvac_loop", "pcgrad_loop", "moco_step", "moco_gramian", "dual_cone",
               "_dual_cone_paths", "aggregate", "mgda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedjd_simt::{op}", "CPU"), op
    assert simt_build.cuda_sources(), "no CUDA sources found"


@pytest.mark.parametrize("name", ["neighbour", "warp_neighbour"])
def test_missing_barrier_changes_with_the_order(name):
    """A kernel that omits its barrier gives order-dependent results; with it, identical ones."""
    outs = {}
    for sync in ["sync", "nosync"]:
        for order in [simt_build.FORWARD, simt_build.REVERSE]:
            simt_build.configure(order)
            outs[sync, order] = EMU.selftest(f"{name}_{sync}")
    simt_build.configure()
    size, shift = (64, 1) if name == "neighbour" else (32, 5)
    for order in [simt_build.FORWARD, simt_build.REVERSE]:
        out = outs["sync", order]
        expected = torch.tensor([(t + shift) % size for t in range(size)]) + out[-1]  # out[-1]: the call's salt
        assert torch.equal(out[:size], expected)
    assert not torch.equal(outs["nosync", simt_build.FORWARD], outs["nosync", simt_build.REVERSE])


@pytest.mark.parametrize(
    "name,message",
    [
        ("exited_lane", r"__shfl_xor_sync\(mask 0xffffffff\) names lane 16, which has exited"),
        ("different_collectives", r"names lane 16, which sits at a different collective: __syncwarp"),
        ("barrier_after_exit", r"__syncthreads reached by 32 threads while 32 threads of the block have exited"),
        ("packed_misaligned", r"misaligned packed load: 16-byte access .* % 16 = 4\)"),
        ("block_1025", r"block \(1025,1,1\) exceeds sm_90's limits"),
        ("grid_y_65536", r"grid \(1,65536,1\) exceeds sm_90's limits"),
        ("grid_zero", r"grid \(0,1,1\) has a zero dimension"),
        ("smem_49k", r"50176 bytes of dynamic shared memory exceed the 49152-byte limit"),
    ],
)
def test_emulator_refuses_broken_rules(name, message):
    with pytest.raises(RuntimeError, match=message) as info:
        EMU.selftest(name)
    assert "simt: kernel `" in str(info.value)  # the error names the kernel


def test_emulator_collectives_atomics_and_smem():
    assert EMU.selftest("packed_aligned")[0].item() == 0 + 1 + 2 + 3
    assert EMU.selftest("atomics")[0].item() == 3 * 64
    assert torch.isnan(EMU.selftest("smem_49k_opt_in")[0])  # unwritten dynamic smem reads as NaN
    out = EMU.selftest("collectives").view(64, 8)[:32].double()
    v = [float(t * t) for t in range(32)]
    pred = [t % 3 == 0 for t in range(32)]
    ballot = sum(1 << t for t in range(32) if pred[t])
    for t in range(32):
        expected = [
            v[3],
            v[t ^ 5],
            v[t + 2] if t + 2 < 32 else v[t],
            v[t - 7] if t >= 7 else v[t],
            v[(t // 8) * 8 + 1],
            float(any(pred)),
            float(all(pred)),
            float(torch.tensor(ballot, dtype=torch.int64).to(torch.float32)),
        ]
        assert out[t].tolist() == expected, t


# ---- gramian and combine -------------------------------------------------------------------


def _gram_cases():
    cases = []
    for i, (m, n) in enumerate(itertools.product(MS, NS)):
        dtypes = DTYPES if FULL else [DTYPES[(i + j) % 4] for j in range(2)]
        for dtype in dtypes:
            if not FULL and m >= 64 and n >= 1000 and dtype != torch.float32:
                continue  # the big tiles once per dtype are enough for the default run
            k = [1, 3, 1000][(i + len(cases)) % 3] if n >= 1000 else [1, 2][i % 2]
            kind = ["random", "collinear", "scaled"][len(cases) % 3]
            asan = (m, n) in {(3, 1000), (17, 4099), (8, 5), (33, 1000)} and dtype in (torch.float32, torch.float16)
            cases.append(_asan(m, n, k, dtype, kind, SMS[len(cases) % 3], asan=asan))
    return cases


def _blocks(J: torch.Tensor, cuts: int, gen: torch.Generator) -> list[torch.Tensor]:
    """J as a list of column blocks (views, cut at `cuts` random places, empty blocks possible;
    their starts are mostly misaligned), or [J] when cuts = 0."""
    n = J.shape[1]
    at = sorted(torch.randint(0, n + 1, (cuts,), generator=gen).tolist())
    edges = [0, *at, n]
    return [J[:, a:b] for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("m,n,k,dtype,kind,sm_count", _gram_cases())
def test_gramian_and_combine(m, n, k, dtype, kind, sm_count):
    """J whole or as a list of column blocks (groups then span blocks, blocks span groups)."""
    gen = torch.Generator().manual_seed(m * 10007 + n + k)
    J = matrix(m, n, dtype, gen, kind)
    sizes = group_sizes(n, k, gen) if k > 1 else [n]
    W = torch.randn(len(sizes), m, generator=gen)
    blocks = _blocks(J, (m + n + k) % 3 * 2, gen)
    G, out, launches = run_schedules(lambda: (EMU.gramian(blocks, sizes), EMU.combine(blocks, W, sizes)),
                                     sm_count=sm_count)
    ref = reference.gramian(J, sizes)
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert G.shape == (len(sizes), m, m)
    assert torch.equal(G, G.transpose(1, 2)), "the Gramian must be exactly symmetric"
    assert rel_err(G, ref) <= TOLERANCE["gramian"][dtype]
    assert out.dtype == dtype and out.shape == (n,)
    assert rel_err(out, reference.combine(J, W, sizes)) <= TOLERANCE["combine"][dtype]
    if m > 0 and n > 0 and m <= 128:
        assert launches > 0, "the emulated kernels did not run"


@pytest.mark.parametrize("dtype", [_asan(d, asan=d in (torch.float32, torch.bfloat16)) for d in DTYPES])
def test_views_misaligned_and_strided(dtype):
    """Views whose start or row stride breaks 16-byte alignment take the scalar path; aligned ones
    the packed path with a scalar head and tail. Both must agree with the reference."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 4103, generator=gen).to(dtype)
    views = [
        base[1:, 1:],             # misaligned start, odd row stride
        base[:, 3:4100],          # misaligned start, unaligned row stride
        base[:5, ::2],            # non-unit column stride (copied)
        base[2:7].T.contiguous().T,  # column-major
        torch.randn(4, 4096, generator=gen).to(dtype)[:, 8:],  # aligned start, aligned stride
        base[:8, :4000],          # aligned start, odd row stride
    ]
    for J in views:
        sizes = [J.shape[1] // 3, J.shape[1] - J.shape[1] // 3]
        W = torch.randn(2, J.shape[0], generator=gen)
        G, out, _ = run_schedules(lambda: (EMU.gramian([J], sizes), EMU.combine([J], W, sizes)))
        assert rel_err(G, reference.gramian(J, sizes)) <= TOLERANCE["gramian"][dtype]
        assert rel_err(out, reference.combine(J, W, sizes)) <= TOLERANCE["combine"][dtype]


def test_gramian_errors_match_the_cpu_kernel():
    J = torch.randn(3, 10)
    for bad, msg in [
        (lambda op: op([J], [4, 5]), r"`group_sizes` must sum to the number of columns n=10, got sum 9"),
        (lambda op: op([J, J[0]], [10]), r"`J\[1\]` must have 2 dimensions, got shape \[10\]"),
        (lambda op: op([J.long()], [10]), r"`J\[0\]` must be a floating-point tensor, got dtype Long"),
        (lambda op: op([J, J[:2]], [20]), r"`J\[1\]` must have m=3 rows like `J\[0\]`, got shape \[2, 10\]"),
    ]:
        for op in [EMU.gramian, torch.ops.fusedjd.gramian]:
            with pytest.raises(RuntimeError, match=msg):
                bad(op)


# ---- GradVac / PCGrad loops ----------------------------------------------------------------


def _loop_cases():
    cases = []
    for i, m in enumerate(MS):
        for dtype in [torch.float32, torch.float64]:
            k = 1 if m >= 64 else [1, 3, 5][i % 3]
            cases.append(_asan(m, k, dtype, asan=m in (3, 33) and dtype == torch.float64))
    return cases


@pytest.mark.parametrize("m,k,dtype", _loop_cases())
def test_gradvac_and_pcgrad_loops(m, k, dtype):
    gen = torch.Generator().manual_seed(m * 31 + k)
    A = torch.randn(k, m, 2 * m + 3, generator=gen, dtype=torch.float64)
    A[:, m // 2] = 0.0  # a zero row
    if m > 2:
        A[:, -1] = -2.0 * A[:, 0]  # a row collinear with row 0, opposite sign
    G = (A @ A.transpose(1, 2)).to(dtype)
    T0 = (torch.rand(k, m, m, generator=gen, dtype=torch.float64) - 0.5).to(dtype)
    perms = ops.draw_perms(k, m, pcgrad=False)
    T = T0.clone()

    def gradvac():
        T.copy_(T0)
        return EMU.gradvac_loop(G, perms, T, 0.4, 1e-8), T

    W, T_emu, _ = run_schedules(gradvac)
    T_ref = T0.double().clone()
    W_ref = reference.gradvac_loop(G, perms, T_ref, 0.4, 1e-8)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(W, W_ref) <= tol and rel_err(T_emu, T_ref) <= tol
    pperms = ops.draw_perms(k, m, pcgrad=True)
    (P, _) = run_schedules(lambda: EMU.pcgrad_loop(G, pperms))
    assert rel_err(P, reference.pcgrad_loop(G, pperms)) <= tol


def test_loop_beyond_shared_memory_rows():
    """m > 767: the chains keep their rows in global memory instead of shared memory."""
    m = 800
    gen = torch.Generator().manual_seed(800)
    A = torch.randn(1, m, 40, generator=gen, dtype=torch.float64)
    G = A @ A.transpose(1, 2)
    perms = ops.draw_perms(1, m, pcgrad=True)
    P = EMU.pcgrad_loop(G, perms)
    assert rel_err(P, torch.ops.fusedjd.pcgrad_loop(G, perms)) <= 1e-10
    gperms = ops.draw_perms(1, m, pcgrad=False)
    T0 = torch.rand(1, m, m, generator=gen, dtype=torch.float64) - 0.5
    T_emu, T_cpu = T0.clone(), T0.clone()
    W = EMU.gradvac_loop(G, gperms, T_emu, 0.5, 1e-8)
    assert rel_err(W, torch.ops.fusedjd.gradvac_loop(G, gperms, T_cpu, 0.5, 1e-8)) <= 1e-10
    assert rel_err(T_emu, T_cpu) <= 1e-10 and not torch.equal(T_emu, T0)


@pytest.mark.parametrize("backend", ["emulated_cuda", "cpu"])
@pytest.mark.parametrize("defect", ["row_itself", "out_of_range", "negative", "nonfinite_G"])
def test_loop_refusal_keeps_targets(backend, defect):
    """An invalid visit order or a non-finite G: NaN weights and the targets bit-identical, on
    both backends."""
    op = EMU if backend == "emulated_cuda" else torch.ops.fusedjd
    gen = torch.Generator().manual_seed(5)
    k, m = 2, 5
    A = torch.randn(k, m, 9, generator=gen, dtype=torch.float64)
    G = A @ A.transpose(1, 2)
    perms = ops.draw_perms(k, m, pcgrad=False)
    if defect == "row_itself":
        perms[1, 3, 2] = 3
    elif defect == "out_of_range":
        perms[0, 0, 0] = m
    elif defect == "negative":
        perms[1, 4, 3] = -1
    else:
        G[1, 2, 0] = float("inf")
    T = torch.rand(k, m, m, generator=gen, dtype=torch.float64)
    T_before = T.clone()
    W = op.gradvac_loop(G, perms, T, 0.5, 1e-8)
    assert torch.isnan(W).all()
    assert torch.equal(_bits(T), _bits(T_before))
    if defect != "nonfinite_G":
        assert torch.isnan(op.pcgrad_loop(G, perms)).all()


# ---- MoCo ----------------------------------------------------------------------------------


def _moco_cases():
    cases = []
    # (129, 300): beyond the engine's rows for every dtype, the stacked [Y; J] Gramian by blas_gram
    shapes = [(1, 9), (2, 1), (3, 4099), (8, 1000), (8, 0), (17, 5), (33, 1000), (64, 4), (65, 1000), (129, 300)]
    for i, (m, n) in enumerate(shapes):
        dtypes = DTYPES if FULL or m > 128 else [DTYPES[i % 4], DTYPES[(i + 1) % 4]]
        for dtype in dtypes:
            projection = (i + len(cases)) % 2 == 1
            rho = 0.0 if i % 3 else 0.3
            cases.append(_asan(m, n, dtype, projection, rho, SMS[len(cases) % 3],
                               asan=(m, n) in {(3, 4099), (8, 1000)}))
    return cases




@pytest.mark.parametrize("m,n,dtype,projection,rho,sm_count", _moco_cases())
def test_moco_steps(m, n, dtype, projection, rho, sm_count):
    gen = torch.Generator().manual_seed(m * 101 + n)
    h = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=rho)
    ref = reference.MoCo(**h, simplex="projection" if projection else "softmax")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    Y = torch.zeros(m, n, dtype=dtype)
    lam = torch.full((m,), 1.0 / max(m, 1), dtype=acc)
    step = torch.zeros((), dtype=torch.long)
    for _ in range(3):
        J = (torch.randn(m, n, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
        blocks = _blocks(J, (m + n) % 3, gen)
        Y0, lam0, step0 = Y.clone(), lam.clone(), step.clone()

        def one_step():
            Y.copy_(Y0), lam.copy_(lam0), step.copy_(step0)
            w, out = EMU.moco_step(blocks, Y, lam, step, h["beta"], h["beta_sigma"], h["gamma"], h["gamma_sigma"], rho,
                                   projection)
            return w, out, Y, lam, step

        w, out, Y_new, lam_new, step_new, _ = run_schedules(one_step, sm_count=sm_count)
        Y.copy_(Y_new), lam.copy_(lam_new), step.copy_(step_new)
        if m == 0:
            continue
        w_ref, out_ref = ref(J)
        assert step.item() == ref.step
        assert rel_err(w, w_ref) <= TOLERANCE["moco"][dtype]
        assert rel_err(lam, w_ref) <= TOLERANCE["moco"][dtype]
        if n > 0:
            assert rel_err(out, out_ref) <= TOLERANCE["moco"][dtype]
            assert rel_err(Y, ref.Y) <= TOLERANCE["moco"][dtype]


@pytest.mark.parametrize("dtype", [_asan(torch.float32, asan=True), torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 65])
def test_moco_nonfinite_keeps_state(dtype, m):
    gen = torch.Generator().manual_seed(11)
    n = 301
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    Y = torch.randn(m, n, generator=gen).to(dtype)
    lam = torch.softmax(torch.randn(m, generator=gen), 0).to(acc)
    step = torch.tensor(4)
    J = torch.randn(m, n, generator=gen).to(dtype)
    J[m - 1, 17] = float("nan")
    before = [_bits(t).clone() for t in (Y, lam, step)]
    w, out = EMU.moco_step([J[:, :100], J[:, 100:]], Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.0, False)
    assert torch.isnan(w).all() and torch.isnan(out).all()
    for t, b in zip((Y, lam, step), before):
        assert torch.equal(_bits(t), b)


def test_random_schedules_agree():
    """Seeded random orders (a new order every round) on a few shapes of each op."""
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(20, 3001, generator=gen)
    A = torch.randn(2, 9, 20, generator=gen, dtype=torch.float64)
    G = A @ A.transpose(1, 2)
    perms = ops.draw_perms(2, 9, pcgrad=False)
    T0 = torch.zeros(2, 9, 9, dtype=torch.float64)
    orders = (simt_build.FORWARD, simt_build.RANDOM, simt_build.REVERSE)
    for seed in [1, 2]:
        run_schedules(lambda: EMU.gramian([J[:, :1500], J[:, 1500:]], [1000, 2001]), orders=orders, seed=seed,
                      sm_count=7)
        run_schedules(lambda: (EMU.gradvac_loop(G, perms, T0.clone(), 0.5, 1e-8),), orders=orders, seed=seed)
        Y, lam, step = torch.zeros(20, 3001), torch.full((20,), 0.05), torch.zeros((), dtype=torch.long)
        run_schedules(lambda: EMU.moco_step([J], Y.clone(), lam.clone(), step.clone(), 0.5, 0.5, 0.1, 0.5, 0.0, True),
                      orders=orders, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 129])
def test_moco_gramian_and_given_gram(dtype, m):
    """The first pass alone (the streaming engine, or for m = 129 the stacked [Y; J] Gramian folded
    on the device) against the CPU kernel, and a step given that Gramian against the step that
    computes it."""
    gen = torch.Generator().manual_seed(m)
    n = 700
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    J = torch.randn(m, n, generator=gen).to(dtype)
    blocks = [J[:, :300], J[:, 300:]]
    Y = torch.randn(m, n, generator=gen).to(dtype)
    step = torch.tensor(3)
    G, _ = run_schedules(lambda: (EMU.moco_gramian(blocks, Y, step, 0.5, 0.5),))
    G_cpu = torch.ops.fusedjd.moco_gramian(blocks, Y, step, 0.5, 0.5)
    assert rel_err(G, G_cpu) <= TOLERANCE["moco"][dtype]
    lam = torch.softmax(torch.randn(m, generator=gen), 0).to(acc)
    outs = []
    for gram in (None, G_cpu):
        Y1, l1, s1 = Y.clone(), lam.clone(), step.clone()
        w, out = EMU.moco_step(blocks, Y1, l1, s1, 0.5, 0.5, 0.1, 0.5, 0.0, False, gram)
        outs.append((w, out, Y1))
    for a, b in zip(*outs):
        assert rel_err(a, b) <= TOLERANCE["moco"][dtype]


@pytest.mark.parametrize("pcgrad", [False, True])
def test_aggregate_runs_the_emulated_kernels_in_turn(pcgrad):
    gen = torch.Generator().manual_seed(12)
    J = torch.randn(9, 2001, generator=gen)
    blocks, sizes = [J[:, :501], J[:, 501:]], [1000, 1001]
    T1 = None if pcgrad else torch.zeros(2, 9, 9)
    T2 = None if pcgrad else torch.zeros(2, 9, 9)
    torch.manual_seed(2)
    out, W = EMU.aggregate(blocks, sizes, T1, 0.5, 1e-8, pcgrad)
    torch.manual_seed(2)
    G = EMU.gramian(blocks, sizes)
    perms = ops.draw_perms(2, 9, pcgrad)
    W2 = EMU.pcgrad_loop(G, perms) if pcgrad else EMU.gradvac_loop(G, perms, T2, 0.5, 1e-8)
    assert torch.equal(W, W2) and torch.equal(out, EMU.combine(blocks, W2, sizes))
    assert pcgrad or torch.equal(T1, T2)
    Wr = (reference.pcgrad_loop(G.double(), perms) if pcgrad
          else reference.gradvac_loop(G.double(), perms, torch.zeros(2, 9, 9, dtype=torch.float64), 0.5, 1e-8))
    assert rel_err(W, Wr) <= 1e-6



# ---- launches, device fills and host-to-device copies per step ---------------------------------
# What a step costs on a GPU beyond its bytes: each kernel launch, each fill or conversion ATen runs
# on the device (a kernel too), each host-to-device copy. The emulator counts fusedjd's launches and
# work-table writes; the profiler sees every ATen op the host functions call (a copy included). On CUDA, only the ops
# below launch no kernel (allocations and views); anything else inside a step is device work.
_NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::select",
                  "aten::narrow", "aten::slice", "aten::alias", "aten::detach", "aten::lift_fresh",
                  "aten::contiguous", "aten::to", "aten::resize_", "aten::expand", "aten::t", "aten::transpose"}


def _step_costs(fn):
    """(fusedjd kernel launches, other ATen device ops by name, work-table writes) of one fn() call,
    after a warm-up call (steady state)."""
    fn()
    before = simt_build.stats()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    after = simt_build.stats()
    device_ops = sorted({e.name for e in prof.events() if e.name.startswith("aten::")} - _NO_KERNEL_OPS)
    return after["launches"] - before["launches"], device_ops, after["table_writes"] - before["table_writes"]


@pytest.mark.parametrize("m, k", [(8, 1), (20, 3), (129, 1)])
def test_gradvac_and_pcgrad_step_launches(m, k):
    """A GradVac or PCGrad step (the aggregate op: Gramian, loop, combine) is at most 5 kernels, no
    fill, no conversion, and no work-table write once the tensors' layout has been seen (the visit
    orders are the step's one host-to-device copy; draw_perms, a host draw, is not counted here).
    Beyond 128 rows the Gramian is ATen's (matrix products, not counted as launches)."""
    gen = torch.Generator().manual_seed(m)
    n = 4099 * k
    J = torch.randn(m, n, generator=gen)
    blocks = [J[:, :1000], J[:, 1000:]]
    sizes = [n // k] * (k - 1) + [n - (n // k) * (k - 1)]
    T = torch.zeros(k, m, m)
    for pcgrad in (False, True):
        launches, device_ops, copies = _step_costs(
            lambda: EMU.aggregate(blocks, sizes, None if pcgrad else T, 0.5, 1e-8, pcgrad))
        if m <= 128:
            assert launches <= 5 and device_ops == [], (launches, device_ops)
        else:
            assert launches <= 3, launches  # the loop (2) and the combine (1)
        assert copies == 0


@pytest.mark.parametrize("m", [8, 40])
def test_moco_step_launches(m):
    """A MoCo step is at most 4 kernels (two for the Gramian of the updated rows, the λ update, the
    second pass), no fill, no work-table write once the layout has been seen."""
    gen = torch.Generator().manual_seed(m)
    J = torch.randn(m, 5003, generator=gen)
    Y = torch.zeros(m, 5003)
    lam = torch.full((m,), 1.0 / m)
    step = torch.zeros((), dtype=torch.long)
    launches, device_ops, copies = _step_costs(
        lambda: EMU.moco_step([J[:, :3], J[:, 3:]], Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.0, False))
    assert launches <= 4 and device_ops == [] and copies == 0, (launches, device_ops, copies)


def test_work_tables_are_written_once_per_layout():
    """A work table reaches the device once per layout and set of tensors: a second call on the
    same tensors writes none, new tensors (new addresses) write a new one. A table of more values
    than one write kernel carries (480) is written in pieces."""
    J = torch.randn(5, 3001)
    W = torch.randn(2, 5)
    EMU.combine([J], W, [1000, 2001])
    before = simt_build.stats()["table_writes"]
    EMU.combine([J], W, [1000, 2001])
    assert simt_build.stats()["table_writes"] == before
    EMU.combine([J], W, [2001, 1000])  # another grouping: another table
    assert simt_build.stats()["table_writes"] == before + 1
    J2 = torch.randn(5, 3001)
    EMU.combine([J2], W, [2001, 1000])  # other addresses: another table
    assert simt_build.stats()["table_writes"] == before + 2
    sizes = [10 + (g % 7) for g in range(250)]  # 250 groups: about 1,800 table values
    Jg = torch.randn(3, sum(sizes), dtype=torch.float64)
    launches = simt_build.stats()["launches"]
    G = EMU.gramian([Jg], sizes)
    assert simt_build.stats()["launches"] - launches >= 2 + 4  # the Gramian's two, the table's pieces
    assert rel_err(G, reference.gramian(Jg, sizes)) < 1e-12


# ---- the dual-cone projector (UPGrad, DualProj) ----------------------------------------------


@pytest.mark.parametrize("m", [_asan(m, asan=m in (5, 17)) for m in (1, 2, 5, 8, 17, 40)])
def test_dual_cone(m):
    """The CUDA kernel (one thread per right-hand side; 70 of them, over 132 multiprocessors: a
    thread per block) equals the CPU kernel (the same float64 solver; the CPU's factor sums in
    blocks of rows, another order) and, for small m, the enumeration of active sets; the same
    under every schedule order, in one launch. Each right-hand side takes the CPU's path (block
    principal pivoting, or the fallback with as many steps)."""
    gen = torch.Generator().manual_seed(m)
    J = torch.randn(m, max(1, m // 2), generator=gen, dtype=torch.float64)
    G = J @ J.T / (J.norm() ** 2) + 1e-4 * torch.eye(m, dtype=torch.float64)  # what Projector solves
    U = torch.randn(70, m, generator=gen, dtype=torch.float64)
    V, launches = run_schedules(lambda: EMU.dual_cone(U, G))
    assert launches == 2 and V.shape == U.shape  # (one launch per schedule order)
    assert rel_err(V, torch.ops.fusedjd.dual_cone(U, G)) < 1e-12
    if m <= 8:
        assert rel_err(V, reference.dual_cone(U, G)) < 1e-12
    paths = EMU._dual_cone_paths(U, G)
    assert torch.equal(paths, torch.ops.fusedjd._dual_cone_paths(U, G)), paths
    V32 = EMU.dual_cone(U.float(), G.float())
    assert V32.dtype == torch.float32 and rel_err(V32, torch.ops.fusedjd.dual_cone(U.float(), G.float())) < 1e-6


@pytest.mark.parametrize("sm_count", [1, 7])
def test_dual_cone_scratch_cap(sm_count):
    """UPGrad's right-hand sides at m = 330: 256 MiB of scratch holds 302 slots, fewer than the 330
    right-hand sides, so threads solve theirs one after another in their slot (7 multiprocessors:
    7 blocks of 44 threads; 1: 5 blocks of 64); equal to the CPU kernel and the same under both
    schedule orders, in one launch."""
    m = 330
    J = torch.randn(m, 2 * m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    G = J @ J.T / (J.norm() ** 2) + 1e-4 * torch.eye(m, dtype=torch.float64)
    U = torch.eye(m, dtype=torch.float64)
    V, launches = run_schedules(lambda: EMU.dual_cone(U, G), sm_count=sm_count)
    assert launches == 2
    assert rel_err(V, torch.ops.fusedjd.dual_cone(U, G)) < 1e-12


# ---- MGDA's weighting ---------------------------------------------------------------------------


@pytest.mark.parametrize("m", [_asan(m, asan=m in (1, 33)) for m in (1, 2, 8, 33, 70)])
def test_mgda(m):
    """The CUDA kernel (one warp: the lanes split the rows of G alpha, lane 0 takes the step) equals
    the CPU kernel (the same operations in the same order, up to the compilers' contraction of
    multiply-adds) on conflicting rows with duplicates (argmin's ties), with the default and a
    long iteration; the same under both schedule orders, in one launch; float32 in, float32 out."""
    gen = torch.Generator().manual_seed(m)
    J = torch.randn(m, 2 * m + 3, generator=gen, dtype=torch.float64)
    J = J - 1.5 * J.mean(0, keepdim=True)  # conflicting
    J[m // 2:] = J[: m - m // 2].clone()  # duplicated rows
    G = J @ J.T
    for eps, iters in ((1e-3, 100), (1e-9, 400)):
        w, launches = run_schedules(lambda: EMU.mgda(G, eps, iters))
        assert launches == 2 and w.shape == (m,)
        assert rel_err(w, torch.ops.fusedjd.mgda(G, eps, iters)) < 1e-13
    w32 = EMU.mgda(G.float(), 1e-3, 100)
    assert w32.dtype == torch.float32 and rel_err(w32, torch.ops.fusedjd.mgda(G.float(), 1e-3, 100)) < 1e-6


def test_mgda_non_finite_empty_and_errors_match():
    G = torch.eye(3, dtype=torch.float64)
    G[2, 0] = float("inf")
    assert torch.isnan(EMU.mgda(G, 1e-3, 100)).all()
    assert EMU.mgda(torch.zeros(0, 0), 1e-3, 100).shape == (0,)
    for args in ((torch.zeros(3, 2), 1e-3, 10), (torch.eye(3).long(), 1e-3, 10), (torch.eye(3), 0.0, 10),
                 (torch.eye(3), 1e-3, 0)):
        with pytest.raises(RuntimeError) as emu:
            EMU.mgda(*args)
        with pytest.raises(RuntimeError) as cpu:
            torch.ops.fusedjd.mgda(*args)
        assert str(emu.value).split("\n")[0] == str(cpu.value).split("\n")[0]


@pytest.mark.asan
def test_dual_cone_non_finite_gives_nan_and_errors_match():
    G = torch.eye(3, dtype=torch.float64)
    G[1, 2] = float("inf")
    assert torch.isnan(EMU.dual_cone(torch.ones(4, 3, dtype=torch.float64), G)).all()
    assert EMU.dual_cone(torch.ones(2, 0), torch.zeros(0, 0)).shape == (2, 0)
    for U, bad in ((torch.ones(4), torch.eye(3)), (torch.ones(3, dtype=torch.long), torch.eye(3))):
        with pytest.raises(RuntimeError) as emu:
            EMU.dual_cone(U, bad)
        with pytest.raises(RuntimeError) as cpu:
            torch.ops.fusedjd.dual_cone(U, bad)
        assert str(emu.value).splitlines()[0] == str(cpu.value).splitlines()[0]
