"""The CPU kernels of one instruction-set level against the float64 reference, in a process of its
own (one level is loaded per process): ``FUSEDJD_CPU_CAPABILITY=avx2 python tests/cpu_level_check.py
avx2`` checks that the avx2 kernels were loaded and that every op (gramian, combine, moco_step,
moco_gramian, gradvac_loop, pcgrad_loop, aggregate, dual_cone, mgda, draw_perms) gives the reference's
results for every dtype it takes, odd sizes, several groups and block lists included, on seeded
inputs and seeded visit orders. ``--report`` prints the largest error of each op and dtype next to
its bound. Run by test_cpu_levels.py for each level this machine supports, and by
scripts/check_cpu_levels.sh under emulated CPUs (qemu)."""

from __future__ import annotations

import sys
from collections import defaultdict

import torch

from torchjd import aggregation as ta

import fusedjd
from fusedjd import ops, reference
from fusedjd.reference import rel_err

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F64, F16, BF16]

# Per-op bounds on one call's relative error against the float64 reference on the same input values,
# about 10x (at least 8x) the largest error measured over the avx512, avx2 and default kernels on
# this project's CPU (``--report``; the kernels are deterministic, so qemu's emulated CPUs give the
# same). Measured at most, float64 / float32 / float16 / bfloat16: gramian 4e-16 / 1e-7 / 1.1e-7 /
# 1.6e-7 (float32 accumulation of half rows); combine 1.7e-16 / 1.1e-7 / 2.4e-4 / 1.9e-3 (rounded to
# J's dtype); moco_step after one step 5.4e-16 / 1.2e-7 / 3.1e-4 / 2.4e-3 (its outputs in J's dtype);
# moco_gramian 4.5e-16 / 1.3e-7 / 3.1e-7 / 1.2e-7 (of Y rounded to its dtype); the loops 1.2e-16 /
# 2.6e-8; aggregate 3e-16 / 1.2e-7 / 2.2e-4 / 2e-3; dual_cone 2.2e-13 / 2e-8 (float64 arithmetic,
# the answer in G's dtype); mgda against torchjd's iteration in float64: the same bounds as
# test_mgda.py (1e-12; float32: the answer's rounding).
BOUNDS: dict[str, dict[torch.dtype, float]] = {
    "gramian": {F64: 5e-15, F32: 2e-6, F16: 2e-6, BF16: 2e-6},
    "combine": {F64: 5e-15, F32: 2e-6, F16: 3e-3, BF16: 2e-2},
    "moco_step": {F64: 5e-15, F32: 2e-6, F16: 3e-3, BF16: 2e-2},
    "moco_gramian": {F64: 5e-15, F32: 2e-6, F16: 3e-6, BF16: 2e-6},
    "gradvac_loop": {F64: 2e-15, F32: 3e-7},
    "pcgrad_loop": {F64: 2e-15, F32: 3e-7},
    "aggregate": {F64: 5e-15, F32: 2e-6, F16: 3e-3, BF16: 2e-2},
    "dual_cone": {F64: 1e-12, F32: 3e-7},
    "mgda": {F64: 1e-12, F32: 2e-7},
}


def _check(worst: dict, op: str, dtype: torch.dtype, err: float, where: tuple) -> None:
    worst[op, dtype] = max(worst[op, dtype], err)
    assert err <= BOUNDS[op][dtype], (op, dtype, err, where)


def _pd(m: int, gen: torch.Generator) -> torch.Tensor:
    """A positive definite Gramian of a rank-deficient J (m > n) plus a small ridge."""
    J = torch.randn(m, max(1, m // 2), generator=gen, dtype=F64)
    return J @ J.T + 1e-3 * torch.eye(m, dtype=F64)


def main(level: str, quick: bool, report: bool) -> None:
    got = fusedjd.build_info()["cpu_capability"]
    assert got == level, f"the {level!r} CPU kernels were asked for, {got!r} were loaded"
    gen = torch.Generator().manual_seed(7)
    shapes = [(1, 7), (3, 1001), (8, 4099)] if quick else [(1, 7), (2, 33), (3, 1001), (8, 4099), (17, 517), (32, 2051)]
    worst: dict = defaultdict(float)
    for dtype in DTYPES:
        acc = ops.acc_dtype(dtype)
        for m, n in shapes:
            where = (level, m, n)
            J = torch.randn(m, n, generator=gen, dtype=F64).to(dtype)
            sizes = [n // 3, 0, n - n // 3]
            blocks = [J[:, : n // 2], J[:, n // 2 :]]
            _check(worst, "gramian", dtype, rel_err(ops.gramian(blocks, sizes), reference.gramian(J, sizes)), where)
            W = torch.randn(3, m, generator=gen)
            _check(worst, "combine", dtype, rel_err(ops.combine(blocks, W, sizes), reference.combine(J, W, sizes)), where)

            # MoCo: one step from a non-zero state, and its first pass alone
            Y = (0.1 * torch.randn(m, n, generator=gen, dtype=F64)).to(dtype)
            lam = torch.softmax(torch.randn(m, generator=gen, dtype=F64), 0).to(acc)
            Y_new = (Y.double() + 0.5 / 3**0.5 * (J.double() - Y.double())).to(dtype)  # b at step 2
            _check(worst, "moco_gramian", dtype,
                   rel_err(ops.moco_gramian(blocks, Y, torch.tensor(2), 0.5, 0.5), reference.gramian(Y_new, [n])[0]), where)
            lam_ref, out_ref, Y_ref, _ = reference.moco_step(J.double(), Y.double(), lam.double(), 2)
            lam_got, out_got = ops.moco_step(blocks, Y, lam, torch.tensor(2), 0.5, 0.5, 0.1, 0.5, 0.0, False)
            for got_, ref_ in ((lam_got, lam_ref), (out_got, out_ref), (Y, Y_ref)):
                _check(worst, "moco_step", dtype, rel_err(got_, ref_), where)

            # GradVac and PCGrad: the loops on a Gramian, and the whole aggregation in one call, on
            # seeded draws (the reference runs on the draws the same seed gives)
            if m > 1:
                for pcgrad in (False, True):
                    if dtype in (F32, F64):
                        Gs = reference.gramian(J, sizes).to(dtype)
                        torch.manual_seed(m + n)
                        perms = ops.draw_perms(3, m, pcgrad=pcgrad)
                        if pcgrad:
                            _check(worst, "pcgrad_loop", dtype,
                                   rel_err(ops.pcgrad_loop(Gs, perms), reference.pcgrad_loop(Gs, perms)), where)
                        else:
                            T = 0.5 * torch.rand(3, m, m, generator=gen, dtype=dtype) - 0.25
                            T_ref = T.double().clone()  # (a copy also in float64: both are updated in place)
                            _check(worst, "gradvac_loop", dtype,
                                   rel_err(ops.gradvac_loop(Gs, perms, T, 0.5, 1e-8),
                                           reference.gradvac_loop(Gs, perms, T_ref, 0.5, 1e-8)), where)
                            _check(worst, "gradvac_loop", dtype, rel_err(T, T_ref), where)  # the targets
                    T = torch.zeros(3, m, m, dtype=acc)
                    torch.manual_seed(m * n)
                    out, weights = ops.aggregate(blocks, sizes, None if pcgrad else T, 0.5, 1e-8, pcgrad)
                    torch.manual_seed(m * n)
                    perms = ops.draw_perms(3, m, pcgrad=pcgrad)
                    G = reference.gramian(J, sizes).to(acc)
                    T_ref = torch.zeros(3, m, m, dtype=F64)
                    W_ref = reference.pcgrad_loop(G, perms) if pcgrad else reference.gradvac_loop(G, perms, T_ref, 0.5, 1e-8)
                    _check(worst, "aggregate", dtype, rel_err(weights, W_ref), where)
                    _check(worst, "aggregate", dtype, rel_err(out, reference.combine(J, W_ref.to(acc), sizes)), where)

        # dual_cone: UPGrad's right-hand sides and random ones, against the enumeration of free sets
        if dtype in (F32, F64):
            for m in (1, 2, 5, 9):
                G = _pd(m, gen).to(dtype)
                U = torch.cat([torch.eye(m, dtype=dtype), torch.randn(3, m, generator=gen, dtype=F64).to(dtype)])
                _check(worst, "dual_cone", dtype, rel_err(ops.dual_cone(U, G), reference.dual_cone(U, G)), (level, m))
            # the level's blocked factor over several blocks and kept rows (m = 17, 40), on what
            # Projector solves for a full-rank J: every right-hand side solved by block principal
            # pivoting (a wrong factor shows as fallbacks, the answers alone would not), at the
            # KKT point
            for m in (17, 40):
                J = torch.randn(m, 2 * m, generator=gen, dtype=F64)
                G = (J @ J.T / (J.norm() ** 2) + 1e-4 * torch.eye(m, dtype=F64)).to(dtype)
                U = torch.eye(m, dtype=dtype)
                assert not torch.ops.fusedjd._dual_cone_paths(U, G).any(), ("dual_cone fallbacks", level, m, dtype)
                kkt = reference.dual_cone_kkt(ops.dual_cone(U, G).double(), U.double(), G.double())
                _check(worst, "dual_cone", dtype, max(kkt), (level, m, "KKT"))
            # mgda: torchjd's Frank-Wolfe iteration (torchjd in float64 on the same Gramian)
            for m in (1, 5, 33):
                J = torch.randn(m, 2 * m + 1, generator=gen, dtype=F64)
                G = (J @ J.T).to(dtype)
                _check(worst, "mgda", dtype, rel_err(ops.mgda(G), ta.MGDAWeighting()(G.double())), (level, m))
    # draw_perms: torchjd's draws, torch.randperm from the default generator row by row (GradVac:
    # randperm(m - 1) mapped onto the other rows; PCGrad: randperm(m) without the row itself)
    for pcgrad in (False, True):
        torch.manual_seed(11)
        got_perms = ops.draw_perms(2, 5, pcgrad)
        torch.manual_seed(11)
        expected = []
        for _ in range(2 * 5):
            i = len(expected) % 5
            p = torch.randperm(5 if pcgrad else 4)
            expected.append(p[p != i] if pcgrad else p + (p >= i).long())
        assert torch.equal(got_perms, torch.stack(expected).view(2, 5, 4)), (level, "draw_perms", pcgrad)
    if report:
        for (op, dtype), err in sorted(worst.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            print(f"  {op:13s} {str(dtype):15s} {err:9.2e}  (bound {BOUNDS[op][dtype]:.0e})")
    print(f"cpu level {level}: ok ({len(BOUNDS)} ops and draw_perms, {len(shapes)} shapes x {len(DTYPES)} dtypes)")


if __name__ == "__main__":
    main(sys.argv[1], "--quick" in sys.argv[2:], "--report" in sys.argv[2:])
