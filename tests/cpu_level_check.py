"""The CPU kernels of one instruction-set level against the float64 reference, in a process of its
own (one level is loaded per process): ``FUSEDJD_CPU_CAPABILITY=avx2 python tests/cpu_level_check.py
avx2`` checks that the avx2 kernels were loaded and that every op gives the reference's results for
every dtype, odd sizes, several groups and block lists included. Run by test_cpu_levels.py for each
level this machine supports, and by scripts/check_cpu_levels.sh under emulated CPUs (qemu)."""

from __future__ import annotations

import sys

import torch

import fusedjd
from fusedjd import ops, reference
from fusedjd.reference import TOLERANCE, rel_err


def main(level: str, quick: bool) -> None:
    got = fusedjd.build_info()["cpu_capability"]
    assert got == level, f"the {level!r} CPU kernels were asked for, {got!r} were loaded"
    gen = torch.Generator().manual_seed(7)
    shapes = [(1, 7), (3, 1001), (8, 4099)] if quick else [(1, 7), (2, 33), (3, 1001), (8, 4099), (17, 517), (32, 2051)]
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
        for m, n in shapes:
            J = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
            sizes = [n // 3, 0, n - n // 3]
            blocks = [J[:, : n // 2], J[:, n // 2 :]]
            G = ops.gramian(blocks, sizes)
            assert rel_err(G, reference.gramian(J, sizes)) <= TOLERANCE["gramian"][dtype], (level, dtype, m, n)
            W = torch.randn(3, m, generator=gen)
            out = ops.combine(blocks, W, sizes)
            assert rel_err(out, reference.combine(J, W, sizes)) <= TOLERANCE["combine"][dtype], (level, dtype, m, n)
            acc = ops.acc_dtype(dtype)
            Y = (0.1 * torch.randn(m, n, generator=gen, dtype=torch.float64)).to(dtype)
            lam = torch.full((m,), 1.0 / m, dtype=acc)
            lam_ref, out_ref, Y_ref, _ = reference.moco_step(J.double(), Y.double(), lam.double(), 2)
            lam_got, out_got = ops.moco_step(blocks, Y, lam, torch.tensor(2), 0.5, 0.5, 0.1, 0.5, 0.0, False)
            assert rel_err(lam_got, lam_ref) <= TOLERANCE["moco"][dtype], (level, dtype, m, n)
            assert rel_err(out_got, out_ref) <= TOLERANCE["moco"][dtype], (level, dtype, m, n)
            assert rel_err(Y, Y_ref) <= TOLERANCE["moco"][dtype], (level, dtype, m, n)
            if dtype in (torch.float32, torch.float64) and m > 1:
                Gs = reference.gramian(J, sizes).to(dtype)
                perms = ops.draw_perms(3, m, pcgrad=False)
                T, T_ref = torch.zeros(3, m, m, dtype=dtype), torch.zeros(3, m, m, dtype=torch.float64)
                tol = 1e-10 if dtype == torch.float64 else 1e-4
                assert rel_err(ops.gradvac_loop(Gs, perms, T, 0.5, 1e-8),
                               reference.gradvac_loop(Gs, perms, T_ref, 0.5, 1e-8)) <= tol, (level, dtype, m)
    print(f"cpu level {level}: ok ({len(shapes)} shapes x 4 dtypes)")


if __name__ == "__main__":
    main(sys.argv[1], "--quick" in sys.argv[2:])
