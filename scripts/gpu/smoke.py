"""Every fusedjd op and class once on the GPU, over the shapes that select different kernel paths:
the workload that scripts/gpu_run.sh runs under compute-sanitizer (memcheck, racecheck, synccheck,
initcheck). It checks nothing itself; the sanitizer does. Each section prints a line when it ends,
so a capped run shows how far it got.

    python3 scripts/gpu/smoke.py            # needs a GPU and a CUDA build of fusedjd
    python3 scripts/gpu/smoke.py --list     # the sections, without running them
    python3 scripts/gpu/smoke.py --cpu      # the same calls on the CPU: checks the workload itself

Sections: every op at test sizes in every dtype (m = 1, odd n, empty column groups); m = 33, 64,
128 (several off-diagonal tiles; 128 rows is the streaming kernel's limit, 64 in float64) and
129 (beyond it); misaligned and strided views; a Jacobian given as a list of blocks; the GradVac
and PCGrad loops at m = 256 (rows in shared memory) and m = 800 (rows in global scratch, beyond
768) and with 300 groups; aggregate; the classes, with orders drawn on the host (the default) and
on the device (``draws="device"``); jac_to_grad; the dual-cone projector (UPGrad, DualProj).
"""

from __future__ import annotations

import sys
import time

import torch

DEV = "cuda"
T0 = time.perf_counter()


def done(name: str) -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"[{time.perf_counter() - T0:6.1f}s] smoke: {name} done", flush=True)


def on(x):
    return x.to(DEV)


def matrix_ops(ops, gen, J, sizes):
    """The Gramian, the combine and two MoCo steps (softmax, projection) on J; returns the Gramian."""
    m, n = J.shape
    G = ops.gramian(J, sizes)
    ops.combine(J, on(torch.randn(len(sizes), m, generator=gen)), sizes)
    Y = torch.zeros(m, n, dtype=J.dtype, device=DEV)
    lam = torch.full((m,), 1.0 / m, dtype=ops.acc_dtype(J.dtype), device=DEV)
    step = torch.zeros((), dtype=torch.long, device=DEV)
    ops.moco_step(J, Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.1, False)
    ops.moco_step(J, Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.1, True)
    return G


def every_op_at_test_sizes(ops, gen):
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
        for m, n, sizes in [(1, 7, [7]), (3, 1001, [500, 0, 501]), (8, 4099, [4099]), (20, 777, [300, 477])]:
            J = on(torch.randn(m, n, generator=gen).to(dtype))
            G = matrix_ops(ops, gen, J, sizes)
            Y = torch.zeros(m, n, dtype=dtype, device=DEV)
            step = torch.zeros((), dtype=torch.long, device=DEV)
            lam = torch.full((m,), 1.0 / m, dtype=ops.acc_dtype(dtype), device=DEV)
            ops.moco_step(J, Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.1, False, ops.moco_gramian(J, Y, step, 0.5, 0.5))
            k = len(sizes)
            ops.gradvac_loop(G, ops.draw_perms(k, m, pcgrad=False, device=DEV), torch.zeros_like(G), 0.5, 1e-8)
            ops.pcgrad_loop(G, ops.draw_perms(k, m, pcgrad=True, device=DEV))


def wide_m(ops, gen):
    for dtype in [torch.float32, torch.float64, torch.bfloat16]:
        for m, n, sizes in [(33, 3001, [1000, 2001]), (64, 2049, [2049]), (128, 1031, [500, 531]), (129, 517, [517])]:
            matrix_ops(ops, gen, on(torch.randn(m, n, generator=gen).to(dtype)), sizes)


def views_and_blocks(ops, gen):
    base = on(torch.randn(9, 40003, generator=gen))
    for view in [base[1:, 1:], base[:, 3:40002], base[:5, ::2], base[2:7].T.contiguous().T]:
        s = [view.shape[1] // 2, view.shape[1] - view.shape[1] // 2]
        ops.gramian(view, s)
        ops.combine(view, on(torch.randn(2, view.shape[0], generator=gen)), s)
    blocks = [on(torch.randn(6, b, generator=gen)) for b in (1, 4097, 0, 333)]
    ops.gramian(blocks, [2000, 0, 2431])
    ops.combine(blocks, on(torch.randn(3, 6, generator=gen)), [2000, 0, 2431])
    Y = torch.zeros(6, 4431, device=DEV)
    lam = torch.full((6,), 1.0 / 6, device=DEV)
    ops.moco_step(blocks, Y, lam, torch.zeros((), dtype=torch.long, device=DEV), 0.5, 0.5, 0.1, 0.5, 0.1, False)


def loops(ops, gen, shapes, dtypes):
    for m, k in shapes:
        A = torch.randn(k, m, m + 3, generator=gen, dtype=torch.float64)
        for dtype in dtypes:
            G = on(A @ A.transpose(1, 2)).to(dtype)
            ops.gradvac_loop(G, ops.draw_perms(k, m, pcgrad=False, device=DEV), torch.zeros_like(G), 0.5, 1e-8)
            ops.pcgrad_loop(G, ops.draw_perms(k, m, pcgrad=True, device=DEV))


def large_loops(ops, gen):
    loops(ops, gen, [(256, 1), (8, 300)], [torch.float64, torch.float32])


def loop_800(ops, gen):  # the longest under a sanitizer: last
    loops(ops, gen, [(800, 1)], [torch.float32])


def aggregate(ops, gen):
    J = on(torch.randn(8, 10001, generator=gen))
    T = torch.zeros(2, 8, 8, device=DEV)
    ops.aggregate(J, [5000, 5001], T, 0.5, 1e-8, False)
    ops.aggregate([J[:, :3], J[:, 3:]], [10001], None, 0.0, 0.0, True)


def classes(fusedjd, gen):
    J = on(torch.randn(8, 50000, generator=gen))
    G = J @ J.T
    aggs = [fusedjd.MoCo(), fusedjd.MoCo(simplex="projection")]
    weightings = []
    for draws in ("torchjd", "device"):
        aggs += [fusedjd.GradVac(draws=draws), fusedjd.PCGrad(draws=draws),
                 fusedjd.GroupedGradVac([50] * 1000, draws=draws)]
        weightings += [fusedjd.GradVacWeighting(draws=draws), fusedjd.PCGradWeighting(draws=draws)]
    for agg in aggs:
        agg(J)
        agg(J)
    for w in weightings:
        w(G)
        w(G)
    J2 = on(torch.randn(40, 3001, generator=gen))
    for agg in [fusedjd.GradVac(), fusedjd.MoCo()]:
        agg(J2)


def jac_to_grad(fusedjd, gen):
    params = [torch.zeros(s, device=DEV, requires_grad=True) for s in [(30, 20), (20,), (7, 3, 5)]]
    for agg in [fusedjd.GradVac(), fusedjd.PCGrad(), fusedjd.MoCo()]:
        for _ in range(2):
            for p in params:
                p.jac = on(torch.randn(4, *p.shape, generator=gen))
            fusedjd.jac_to_grad(params, agg)


def projector(fusedjd, gen):
    for m in (1, 7, 40, 130):
        A = on(torch.randn(m, m // 2 + 1, generator=gen, dtype=torch.float64))
        G = A @ A.T / (A.norm() ** 2) + 1e-4 * torch.eye(m, dtype=torch.float64, device=DEV)
        fusedjd.ops.dual_cone(torch.eye(m, dtype=torch.float64, device=DEV), G)
        fusedjd.ops.dual_cone(on(torch.randn(3, 2, m, generator=gen)), G.float())
    J = on(torch.randn(12, 3001, generator=gen))
    fusedjd.UPGrad()(J)
    fusedjd.DualProj()(J)


SECTIONS = [
    ("every op at test sizes, 4 dtypes", every_op_at_test_sizes, "ops"),
    ("m = 33, 64, 128, 129", wide_m, "ops"),
    ("views and block lists", views_and_blocks, "ops"),
    ("aggregate", aggregate, "ops"),
    ("classes (host and device draws)", classes, "fusedjd"),
    ("jac_to_grad", jac_to_grad, "fusedjd"),
    ("the dual-cone projector (UPGrad, DualProj)", projector, "fusedjd"),
    ("loops at m = 256 and with 300 groups", large_loops, "ops"),
    ("loops at m = 800 (rows in global scratch)", loop_800, "ops"),
]


def main() -> int:
    global DEV
    if "--list" in sys.argv[1:]:
        for name, _, _ in SECTIONS:
            print(name)
        return 0
    import fusedjd
    from fusedjd import ops

    if "--cpu" in sys.argv[1:]:
        DEV = "cpu"
    else:
        assert torch.cuda.is_available() and ops.has_cuda_kernels(), "needs a GPU and a CUDA build of fusedjd"
    gen = torch.Generator().manual_seed(0)
    failed = 0
    for name, fn, arg in SECTIONS:
        try:
            fn(ops if arg == "ops" else fusedjd, gen)
            done(name)
        except Exception as e:  # the sanitizer's report is what matters; a Python error is reported too
            failed += 1
            print(f"smoke: {name} FAILED: {type(e).__name__}: {e}", flush=True)
    print("smoke OK" if not failed else f"smoke: {failed} section(s) FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
