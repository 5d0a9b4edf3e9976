"""Runs every fusedjd op once on CUDA at test sizes (m = 1, odd n, groups, half types):
the workload for compute-sanitizer (memcheck, racecheck) in scripts/gpu_run.sh."""

import torch

import fusedjd
from fusedjd import ops

assert torch.cuda.is_available() and ops.has_cuda_kernels(), "needs a GPU and a CUDA build of fusedjd"
gen = torch.Generator().manual_seed(0)
for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
    for m, n, sizes in [(1, 7, [7]), (3, 1001, [500, 0, 501]), (8, 4099, [4099]), (20, 777, [300, 477])]:
        J = torch.randn(m, n, generator=gen).to(dtype).cuda()
        G = ops.gramian(J, sizes)
        W = ops.combine(J, torch.randn(len(sizes), m, generator=gen).cuda(), sizes)
        Y = torch.zeros(m, n, dtype=dtype, device="cuda")
        lam = torch.full((m,), 1.0 / m, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         device="cuda")
        step = torch.zeros((), dtype=torch.long, device="cuda")
        ops.moco_step(J, Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.1, True)
        if dtype in (torch.float32, torch.float64):
            Gs = G.to(dtype)
            ops.gradvac_loop(Gs, ops.draw_perms(len(sizes), m, pcgrad=False, device="cuda"), torch.zeros_like(Gs), 0.5, 1e-8)
            ops.pcgrad_loop(Gs, ops.draw_perms(len(sizes), m, pcgrad=True, device="cuda"))
J = torch.randn(8, 50000, device="cuda")
fusedjd.GroupedGradVac([50] * 1000)(J)
fusedjd.MoCo()(J)
torch.cuda.synchronize()
print("cuda smoke OK")
