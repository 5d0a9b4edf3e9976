"""fusedjd benchmark: fusedjd against torchjd 0.18 and plain PyTorch, on the device at hand.

    python bench/run.py               # default set, a few minutes on a 2-core CPU
    python bench/run.py --full        # the full grid
    python bench/run.py --device cuda # the GPU grid (bench/gpu_grid.py), about 4 minutes on an H200
    python bench/run.py --tiny        # the GPU grid's code on a tiny grid, on the CPU (a dry run)

Every row checks fusedjd's result against the baseline (or fusedjd.reference) before it times
anything; a row whose check fails is marked MISMATCH and the run exits non-zero. Times are
medians (CUDA events on a GPU). time / floor divides by the row's floor: on the CPU the larger of
the time of reading the row's own tensors (as many passes as the op makes, with the fastest read,
in the row's cache state) and, for m >= 16, of its multiply-adds at the rate the Gramian engine's
register blocks reach in L1; on a GPU the time of moving the same bytes at the device-to-device
copy's bandwidth. Floors are measured right before and right after the row is timed: on a shared
machine they move within a run.
The markdown tables are printed and written, with a speedup plot when matplotlib is installed,
to bench/results/local/ (not tracked); --save writes them to bench/results/ instead, the
snapshot the README shows.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torchjd import aggregation as ta
from torchjd.autogram import Engine
from torchjd.autojac import jac_to_grad, mtl_backward

import fusedjd
import gpu_grid  # bench/gpu_grid.py
import probes  # bench/probes.py: the floors' kernels, built for the CPU level loaded here
from common import (Progress, Table, fmt_mib, fmt_time, fmt_x, median_time, peak_bytes,  # bench/ is sys.path[0]
                    save_figure, sync)
from fusedjd import reference
from fusedjd.reference import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))


class PlainMoCo(ta.Aggregator):
    """MoCo written as tightly as plain PyTorch allows (default hyper-parameters, softmax), as a
    torchjd aggregator so that jac_to_grad takes it: ``Y.lerp_(J, b)`` in place, then
    ``λ = softmax(λ − c (Y Yᵀ) λ)`` and ``λᵀ Y``."""

    def __init__(self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5):
        super().__init__()
        self.hyper = (beta, beta_sigma, gamma, gamma_sigma)
        self.Y = None

    def forward(self, J):
        beta, beta_sigma, gamma, gamma_sigma = self.hyper
        if self.Y is None or self.Y.shape != J.shape or self.Y.dtype != J.dtype or self.Y.device != J.device:
            self.Y = torch.zeros_like(J)
            self.lam = torch.full((J.shape[0],), 1.0 / max(J.shape[0], 1), dtype=J.dtype, device=J.device)
            self.k = 0
        self.k += 1
        b, c = beta / self.k**beta_sigma, gamma / self.k**gamma_sigma
        self.Y.lerp_(J, b)
        self.lam = torch.softmax(self.lam - c * ((self.Y @ self.Y.T) @ self.lam), 0)
        return self.lam @ self.Y


@dataclass(frozen=True)
class GramCase:
    m: int
    n: int
    grouping: tuple[str, list[int]] | None = None  # (name, sizes): n is then sum(sizes)
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class LoopCase:
    m: int
    with_torchjd: bool  # False where torchjd's loop would take minutes


@dataclass(frozen=True)
class AggCase:
    kind: str  # "GradVac", "PCGrad", "UPGrad", "DualProj" or "GroupedGradVac"
    m: int
    n: int
    grouping: tuple[str, list[int]] | None = None


@dataclass(frozen=True)
class MocoCase:
    m: int
    n: int


@dataclass(frozen=True)
class TrainCase:
    d_in: int
    hidden: int
    tasks: int
    batch: int


@dataclass
class Run:
    """What every section of one benchmark run shares."""

    device: str
    progress: Progress
    speedups: dict = field(default_factory=lambda: {"m": [], "n": []})
    mismatches: list[str] = field(default_factory=list)

    def check(self, label: str, got: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
        err = rel_err(got, expected)
        if not err < tol:
            self.mismatches.append(f"{label}: relative error {err:.2e} > {tol:.0e}")
            return "MISMATCH"
        return "ok"

    bandwidths: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)

    def timed(self, fn, tensors: list[torch.Tensor], passes: float, madds: float = 0.0) -> tuple[float, str]:
        """fn's median time and its time / floor. The floor is the larger of
        - the read floor: ``passes`` reads of the row's own tensors, timed with the fastest read
          (the better of fusedjd_bench.read, a vectorized read over the threads, and torch.sum) on
          the same tensors in the same cache state (in cache for a small row, streamed for a large
          one);
        - the multiply-add floor (rows with m >= 16, ``madds`` given): madds at the rate the
          Gramian engine's own register blocks reach on data in L1 (fusedjd_bench.multiply_adds);
        each measured right before and right after fn is timed, the better of the two: on a shared
        machine what other processes leave moves within a run. The ratio is marked "(madds)" where
        the multiply-add floor is the larger. (At n <= 1e4 a read floor is mostly one call's fixed
        cost, a few microseconds, which the timed op pays too.)"""
        read = read_time(tensors)
        peak = multiply_add_rate(tensors[0].dtype) if madds else 0.0
        t = median_time(fn, self.device)
        read = min(read, read_time(tensors))
        peak = max(peak, multiply_add_rate(tensors[0].dtype)) if madds else 0.0
        nbytes = sum(x.numel() * x.element_size() for x in tensors)
        self.bandwidths.append(nbytes / read)
        if madds and tensors[0].dtype == torch.float32:
            self.peaks.append(peak)
        floor_read, floor_madds = passes * read, (madds / peak if madds else 0.0)
        ratio = t / max(floor_read, floor_madds)
        label = f"{ratio:.2f}" + (" (madds)" if floor_madds > floor_read else "")
        if ratio < 0.95:
            label += " — below the floor: the floor was timed in a noisier moment than the row"
        return t, label


def read_time(tensors: list[torch.Tensor]) -> float:
    """The time of one read of the tensors' bytes: the better of fusedjd_bench.read (vectors, all
    threads) and torch.sum of each, both medians, on the tensors as they are now (in cache or not)."""
    probe = median_time(lambda: torch.ops.fusedjd_bench.read(tensors), "cpu", budget_s=0.1)
    summed = median_time(lambda: [x.sum() for x in tensors], "cpu", budget_s=0.1)
    return min(probe, summed)


def multiply_add_rate(dtype: torch.dtype) -> float:
    """Multiply-adds per second of the Gramian engine's register blocks on rows of ``dtype`` (as
    the engine reads them: float16 widened in registers, bfloat16 pairs where the CPU has them) in
    L1, over torch's threads (fusedjd_bench.multiply_adds: a median of calls of about a millisecond)."""
    reps = 1024
    count = torch.ops.fusedjd_bench.multiply_adds(reps, dtype)
    return count / median_time(lambda: torch.ops.fusedjd_bench.multiply_adds(reps, dtype), "cpu", budget_s=0.1)


def gramian_madds(m: int, n: int) -> float:
    """The Gramian's multiply-adds: m (m + 1) / 2 per column."""
    return m * (m + 1) / 2 * n


def seeded(fn, seed=0):
    def run():
        torch.manual_seed(seed)
        return fn()
    return run


def nice_n(n: int) -> str:
    return f"1e{len(str(n)) - 1}" if str(n).strip("0") == "1" else f"{n:,}"


def per_parameter_sizes() -> tuple[str, list[int]]:
    """The per-parameter grouping of a real model's parameter list (a small CNN + MLP)."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64),
        nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.Flatten(), nn.Linear(128 * 16, 256), nn.Linear(256, 256),
        nn.Linear(256, 128),
    )
    sizes = fusedjd.groups.all_matrix(model.parameters())
    return f"CNN, {len(sizes)} tensors", sizes


def bench_gramian(run: Run, cfg: list[GramCase]):
    device = run.device
    t = Table("Gramian: fusedjd.ops.gramian vs torch `J @ J.T` (per group for grouped J), J in its dtype",
              ["m", "n", "dtype", "groups", "check", "fusedjd", "GB/s", "time / floor", "torch", "speedup"])
    for case in cfg:
        m, n, grouping, dtype = case.m, case.n, case.grouping, case.dtype
        name, sizes = grouping if grouping else ("1", [n])
        n = sum(sizes)
        J = torch.randn(m, n, device=device).to(dtype)
        fused = lambda: fusedjd.ops.gramian(J, sizes)  # noqa: E731
        if len(sizes) == 1:
            base = lambda: J @ J.T  # noqa: E731
        else:
            base = lambda: [b @ b.T for b in J.split(sizes, dim=1)]  # noqa: E731
        tol = 10 * reference.TOLERANCE["gramian"][dtype]
        status = run.check(f"gramian m={m} n={n} {dtype} {name}", fused(), reference.gramian(J, sizes), tol)
        nbytes = J.element_size() * m * n
        tf, ratio = run.timed(fused, [J], 1, gramian_madds(m, n) if m >= 16 else 0.0)
        tb = median_time(base, device)
        t.rows.append([str(m), nice_n(n), str(dtype).replace("torch.", ""), name, status, fmt_time(tf),
                       f"{nbytes / tf / 1e9:.0f}", ratio, fmt_time(tb), fmt_x(tb / tf)])
        run.progress.step(f"gramian m={m} n={n}")
        del J
    return t


def bench_loops(run: Run, cfg: list[LoopCase]):
    device = run.device
    t = Table("GradVac / PCGrad loop on the Gramian (weightings, fp32)",
              ["weighting", "m", "check", "fusedjd", "torchjd 0.18", "speedup"])
    for case in cfg:
        m, with_torchjd = case.m, case.with_torchjd
        A = torch.randn(m, 4 * m + 8, device=device)
        G = A @ A.T
        for ours_cls, theirs_cls in [(fusedjd.GradVacWeighting, ta.GradVacWeighting),
                                     (fusedjd.PCGradWeighting, ta.PCGradWeighting)]:
            ours = ours_cls()
            tf = median_time(lambda: ours(G), device)
            if with_torchjd:
                status = run.check(f"{ours_cls.__name__} m={m}", seeded(lambda: ours_cls()(G))(),
                               seeded(lambda: theirs_cls()(G))(), 1e-4)
                theirs = theirs_cls()
                tt = median_time(lambda: theirs(G), device, budget_s=1.0, min_reps=2)
                if ours_cls is fusedjd.GradVacWeighting:
                    run.speedups["m"].append((m, tt / tf))
            else:
                status, tt = "ok (no baseline)", None
            t.rows.append([ours_cls.__name__, str(m), status, fmt_time(tf),
                           fmt_time(tt) if tt else "not run (too slow)", fmt_x(tt / tf) if tt else "—"])
            run.progress.step(f"{ours_cls.__name__} m={m}")
    return t


def bench_projector(run: Run, ms: list[int]):
    """UPGrad's and DualProj's weightings on an m x m Gramian: fusedjd's projector (the dual_cone
    op) against torchjd 0.18's default, quadprog through numpy. The Gramian is that of a
    rank-deficient J (n = m / 2 + 1 columns), so the projections are not trivial."""
    device = run.device
    t = Table("UPGrad / DualProj weighting on the Gramian (fp32): fusedjd.Projector vs torchjd's quadprog",
              ["weighting", "m", "check", "fusedjd", "torchjd 0.18", "speedup"])
    for m in ms:
        gen = torch.Generator().manual_seed(m)
        A = torch.randn(m, m // 2 + 1, generator=gen).to(device)
        G = A @ A.T
        for ours_cls, theirs_cls in [(fusedjd.UPGradWeighting, ta.UPGradWeighting),
                                     (fusedjd.DualProjWeighting, ta.DualProjWeighting)]:
            ours, theirs = ours_cls(), theirs_cls()
            # float32 Gramian, float64 solvers: the weights agree to the Gramian's precision
            status = run.check(f"{ours_cls.__name__} m={m}", ours(G), theirs(G), 1e-4)
            tf = median_time(lambda: ours(G), device)
            tt = median_time(lambda: theirs(G), device, budget_s=1.0, min_reps=2)
            t.rows.append([ours_cls.__name__, str(m), status, fmt_time(tf), fmt_time(tt), fmt_x(tt / tf)])
            run.progress.step(f"{ours_cls.__name__} m={m}")
    return t


def bench_aggregators(run: Run, cfg: list[AggCase]):
    device = run.device
    t = Table("Aggregators end to end (fp32): fusedjd vs torchjd 0.18",
              ["aggregator", "m", "n", "check", "fusedjd", "GB/s", "time / floor", "torch J@Jᵀ + wᵀJ",
               "speedup vs J@Jᵀ + wᵀJ (+10 µs at m ≤ 8)", "torchjd", "speedup"])
    for case in cfg:
        kind, m, n, grouping = case.kind, case.m, case.n, case.grouping
        if grouping:
            name, sizes = grouping
            n = sum(sizes)
        J = torch.randn(m, n, device=device)
        w = torch.randn(m, device=device)
        if kind == "GroupedGradVac":
            ours = fusedjd.GroupedGradVac(sizes)
            recipe = [ta.GradVac() for _ in sizes]

            def theirs_call():
                return torch.cat([a(b) for a, b in zip(recipe, J.split(sizes, dim=1))])

            fresh = [ta.GradVac() for _ in sizes]
            status = run.check(f"GroupedGradVac m={m}", seeded(lambda: fusedjd.GroupedGradVac(sizes)(J))(),
                           seeded(lambda: torch.cat([a(b) for a, b in zip(fresh, J.split(sizes, dim=1))]))(), 1e-3)
            label = f"GroupedGradVac ({name})"
            plain = None
        else:
            ours_cls, theirs_cls = {"GradVac": (fusedjd.GradVac, ta.GradVac), "PCGrad": (fusedjd.PCGrad, ta.PCGrad),
                                    "UPGrad": (fusedjd.UPGrad, ta.UPGrad), "DualProj": (fusedjd.DualProj, ta.DualProj)}[kind]
            ours, theirs = ours_cls(), theirs_cls()
            theirs_call = lambda: theirs(J)  # noqa: E731
            status = run.check(f"{kind} m={m} n={n}", seeded(lambda: ours_cls()(J))(), seeded(lambda: theirs_cls()(J))(), 1e-3)
            label = kind
            plain = median_time(lambda: (J @ J.T, w @ J), device)
        nbytes = 2 * 4 * m * n  # two reads of J: the Gramian's and the combination's
        tf, ratio = run.timed(lambda: ours(J), [J], 2, gramian_madds(m, n) + m * n if m >= 16 else 0.0)
        tt = median_time(theirs_call, device, budget_s=1.0, min_reps=2)
        if kind == "GradVac":
            run.speedups["n"].append((m, n, tt / tf))
        # against plain `J @ J.T, w @ J` (no loop), with 10 µs for the loop and the draws at m <= 8
        allowance = None if plain is None else plain + (10e-6 if m <= 8 else 0.0)
        t.rows.append([label, str(m), nice_n(n), status, fmt_time(tf), f"{nbytes / tf / 1e9:.0f}",
                       ratio, fmt_time(plain), fmt_x(allowance / tf) if allowance else "—", fmt_time(tt),
                       fmt_x(tt / tf)])
        run.progress.step(f"{label} m={m} n={n}")
        del J
    return t


def bench_moco(run: Run, cfg: list[MocoCase]):
    device = run.device
    t = Table("MoCo step (fp32): fusedjd vs plain PyTorch MoCo (Y.lerp_(J, b), Y Yᵀ, the softmax step, λᵀY)",
              ["m", "n", "check", "fusedjd", "GB/s", "time / floor (5 passes)", "plain PyTorch", "speedup",
               "peak extra memory fusedjd / plain"])
    for case in cfg:
        m, n = case.m, case.n
        # gradient-sized rows (|g_i| ~ 1): with N(0, 1) entries and n = 1e6 the logits of the
        # weight update reach 1e5 and the softmax is one-hot and ill-conditioned in float32
        J = torch.randn(m, n, device=device) / n**0.5
        # reference in float64: the float32 plain loop is itself off by its rounding, which
        # the softmax amplifies when |J|^2 is large
        status = run.check(f"MoCo m={m} n={n}", fusedjd.MoCo()(J), reference.MoCo()(J)[1], 1e-4)
        ours, plain = fusedjd.MoCo(), PlainMoCo()
        ours(J), plain(J)
        mem = "—"
        if device == "cuda":
            peaks = [peak_bytes(lambda: agg(J), device) / (4 * m * n) for agg in (ours, plain)]
            mem = f"{peaks[0]:.2f} / {peaks[1]:.2f} × J"
        nbytes = 5 * 4 * m * n
        # five passes of m n: two reads of J and Y (2.5 of the pair; the write counted as a read)
        tf, ratio = run.timed(lambda: ours(J), [J, ours.y], 2.5, gramian_madds(m, n) + m * n if m >= 16 else 0.0)
        tp = median_time(lambda: plain(J), device)
        t.rows.append([str(m), nice_n(n), status, fmt_time(tf), f"{nbytes / tf / 1e9:.0f}",
                       ratio, fmt_time(tp), fmt_x(tp / tf), mem])
        run.progress.step(f"MoCo m={m} n={n}")
        del J, ours, plain
    return t


class MultiTaskMLP(nn.Module):
    def __init__(self, d_in, hidden, tasks):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(tasks)])


def bench_jac_to_grad(run: Run, cfg: TrainCase):
    """The training step as a user runs it: forward, mtl_backward, jac_to_grad, SGD step, with
    torchjd's jac_to_grad in both of its modes and fusedjd.jac_to_grad; time and peak memory of
    the whole step (the .jac tensors included: they are what mtl_backward leaves)."""
    device = run.device
    d_in, hidden, tasks, batch = cfg.d_in, cfg.hidden, cfg.tasks, cfg.batch
    torch.manual_seed(0)
    net = MultiTaskMLP(d_in, hidden, tasks).to(device)
    enc = list(net.encoder.parameters())
    n = sum(p.numel() for p in enc)
    x = torch.randn(batch, d_in, device=device)
    ys = [torch.randn(batch, device=device) for _ in range(tasks)]
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    t = Table(f"Training step with jac_to_grad: MLP encoder ({d_in}→{hidden}→{hidden}→{hidden}, {len(enc)} tensors, "
              f"n = {n:,}), {tasks} task heads, batch {batch}: forward, mtl_backward, jac_to_grad, SGD step. "
              f"Peak: tensors allocated during the step (its m × n .jac tensors are {fmt_mib(tasks * n * 4)})",
              ["aggregator", "step: torchjd jac_to_grad", "torchjd optimize_gramian_computation=True",
               "fusedjd.jac_to_grad", "speedup (vs torchjd's faster mode)", "jac_to_grad alone: torchjd / optimize / fusedjd",
               "speedup", "step's peak memory: torchjd / optimize / fusedjd"])

    def step(j2g, agg, **kw):
        def one_step():
            f = net.encoder(x)
            losses = [((h(f).squeeze(-1) - y) ** 2).mean() for h, y in zip(net.heads, ys)]
            opt.zero_grad()
            mtl_backward(losses, features=f)
            j2g(enc, agg, **kw)
            opt.step()
        return one_step

    rows = [
        ("UPGrad", ta.UPGrad, ta.UPGrad),
        ("GradVac (torchjd's / fusedjd's)", ta.GradVac, fusedjd.GradVac),
        ("MoCo (plain PyTorch / fusedjd's)", PlainMoCo, fusedjd.MoCo),
    ]
    for name, make_theirs, make_ours in rows:
        variants = [(jac_to_grad, make_theirs, {})]
        gramian_based = isinstance(make_theirs(), ta.GramianWeightedAggregator)
        if gramian_based:
            variants.append((jac_to_grad, make_theirs, {"optimize_gramian_computation": True}))
        variants.append((fusedjd.jac_to_grad, make_ours, {}))
        times, alone, peaks = [], [], []
        for j2g, make, kw in variants:
            agg = make()
            fn = step(j2g, agg, **kw)
            times.append(median_time(fn, device, budget_s=1.0))
            peaks.append(peak_bytes(fn, device))

            def only_jac_to_grad():  # on the .jac tensors the last step's mtl_backward left
                for p in enc:
                    p.grad = None
                j2g(enc, agg, retain_jac=True, **kw)

            f = net.encoder(x)
            mtl_backward([((h(f).squeeze(-1) - y) ** 2).mean() for h, y in zip(net.heads, ys)], features=f)
            alone.append(median_time(only_jac_to_grad, device, budget_s=0.5))
            for p in enc:
                del p.jac
        if not gramian_based:
            for v in (times, alone, peaks):
                v.insert(1, None)
        best = min(x for x in times[:2] if x is not None)
        best_alone = min(x for x in alone[:2] if x is not None)
        t.rows.append([name, fmt_time(times[0]), fmt_time(times[1]), fmt_time(times[2]), fmt_x(best / times[2]),
                       " / ".join(fmt_time(a) for a in alone), fmt_x(best_alone / alone[2]),
                       " / ".join(fmt_mib(p) for p in peaks)])
        run.progress.step(f"jac_to_grad {name}")
    return t


def bench_training(run: Run, cfg: TrainCase):
    device = run.device
    d_in, hidden, tasks, batch = cfg.d_in, cfg.hidden, cfg.tasks, cfg.batch
    t = Table(f"Training step through torchjd's jac_to_grad (fusedjd's classes as drop-in aggregators): MLP encoder "
              f"({d_in}→{hidden}→{hidden}→{hidden}), {tasks} task heads, batch {batch}",
              ["aggregation", "torchjd 0.18 / baseline", "fusedjd", "speedup"])
    torch.manual_seed(0)
    net = MultiTaskMLP(d_in, hidden, tasks).to(device)
    x = torch.randn(batch, d_in, device=device)
    ys = [torch.randn(batch, device=device) for _ in range(tasks)]
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    layers = [m for m in net.encoder.modules() if list(m.parameters(recurse=False))]

    def step(aggregate):
        def one_step():
            f = net.encoder(x)
            losses = [((h(f).squeeze(-1) - y) ** 2).mean() for h, y in zip(net.heads, ys)]
            opt.zero_grad()
            mtl_backward(losses, features=f)
            aggregate()
            opt.step()
        return one_step

    enc = list(net.encoder.parameters())
    pairs = [
        ("GradVac", ta.GradVac(), fusedjd.GradVac()),
        ("PCGrad", ta.PCGrad(), fusedjd.PCGrad()),
    ]
    for name, theirs, ours in pairs:
        tt = median_time(step(lambda: jac_to_grad(enc, theirs)), device, budget_s=1.0)
        tf = median_time(step(lambda: jac_to_grad(enc, ours)), device, budget_s=1.0)
        t.rows.append([name, fmt_time(tt), fmt_time(tf), fmt_x(tt / tf)])
        run.progress.step(f"train {name}")
    recipe = [ta.GradVac() for _ in layers]
    grouped = fusedjd.GroupedGradVac(fusedjd.groups.all_layer(net.encoder))

    def torchjd_recipe():
        for layer, agg in zip(layers, recipe):
            jac_to_grad(layer.parameters(), agg)

    tt = median_time(step(torchjd_recipe), device, budget_s=1.0)
    tf = median_time(step(lambda: jac_to_grad(enc, grouped)), device, budget_s=1.0)
    t.rows.append([f"GradVac all_layer ({len(layers)} groups): torchjd recipe vs GroupedGradVac", fmt_time(tt),
                   fmt_time(tf), fmt_x(tt / tf)])
    run.progress.step("train GroupedGradVac")
    plain, moco = PlainMoCo(), fusedjd.MoCo()
    tt = median_time(step(lambda: jac_to_grad(enc, plain)), device, budget_s=1.0)
    tf = median_time(step(lambda: jac_to_grad(enc, moco)), device, budget_s=1.0)
    t.rows.append(["MoCo: plain PyTorch vs fusedjd", fmt_time(tt), fmt_time(tf), fmt_x(tt / tf)])
    run.progress.step("train MoCo")

    # per-sample weighting through autogram: m = batch size
    pbatch = min(batch, 32)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(device)
    xs, yv = torch.randn(pbatch, d_in, device=device), torch.randn(pbatch, device=device)
    popt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine = Engine(model, batch_dim=0)

    def autogram_step(weighting):
        def one_step():
            losses = (model(xs).squeeze(-1) - yv) ** 2
            popt.zero_grad()
            losses.backward(weighting(engine.compute_gramian(losses)))
            popt.step()
        return one_step

    tt = median_time(autogram_step(ta.GradVacWeighting()), device, budget_s=1.0, min_reps=2)
    tf = median_time(autogram_step(fusedjd.GradVacWeighting()), device, budget_s=1.0)
    t.rows.append([f"per-sample GradVacWeighting via autogram (m = {pbatch})", fmt_time(tt), fmt_time(tf),
                   fmt_x(tt / tf)])
    run.progress.step("train autogram")
    return t


def configs(device: str, full: bool):
    """The CPU grid (the GPU's is bench/gpu_grid.py)."""
    grouping = per_parameter_sizes()
    ns = [10**3, 10**4, 10**5, 10**6, 4 * 10**6] + ([10**7] if full else [])
    groups64 = ("64 groups", [4 * 10**6 // 64] * 64)
    gram = [GramCase(m, n) for m in (2, 8, 32) for n in ns] + [GramCase(8, 0, grouping)]
    gram += [GramCase(8, 0, groups64)] + [GramCase(8, 4 * 10**6, g, dt) for dt in (torch.bfloat16, torch.float16)
                                         for g in (None, groups64)]
    gram += [GramCase(32, 10**6, None, dt) for dt in (torch.bfloat16, torch.float16)]
    agg = [AggCase(kind, m, n) for kind in ("GradVac", "PCGrad") for m in (2, 8, 32) for n in ns]
    # UPGrad and DualProj on the same fused route (Gramian, weighting, combination), next to GradVac's rows
    agg += [AggCase(kind, m, n) for kind in ("UPGrad", "DualProj") for m in (8, 32) for n in (10**4, 10**6, 4 * 10**6)]
    agg += [AggCase("GroupedGradVac", 8, 0, grouping)]
    moco = [MocoCase(m, n) for m in (2, 8, 32) for n in ns]
    train = TrainCase(256, 512, 8, 128)
    loops = [LoopCase(m, True) for m in ((2, 4, 8, 16, 32) if full else (2, 8, 32))]
    loops += [LoopCase(64, full), LoopCase(256, False)]
    return gram, loops, agg, moco, train


PROJECTOR_MS = [2, 8, 32, 64, 128]


TRAIN_ROWS = 5 + 3  # the rows of bench_training and bench_jac_to_grad


def gpu_extras(device: str, tiny: bool):
    """The CPU benchmark's tables that the GPU run adds after its grid, while time is left: the
    (title, table maker) pairs, and the list their checks' mismatches go to."""
    if tiny:
        loops, train = [LoopCase(2, True), LoopCase(8, True)], TrainCase(32, 64, 3, 16)
    else:
        loops = [LoopCase(m, True) for m in (2, 8, 32)] + [LoopCase(64, False), LoopCase(256, False)]
        train = TrainCase(512, 1024, 8, 256)
    run = Run(device, Progress(2 * len(loops) + TRAIN_ROWS))
    return [
        ("GradVac / PCGrad loop on the Gramian", lambda: bench_loops(run, loops)),
        ("Training step with jac_to_grad", lambda: bench_jac_to_grad(run, train)),
        ("Training step through torchjd's jac_to_grad", lambda: bench_training(run, train)),
    ], run.mismatches


def plot(speedups, path, device_name):
    """Two panels: GradVacWeighting's speedup against m, the GradVac aggregator's against n (one
    line per m). Log axes with plain tick labels and a dashed 1x line (parity with torchjd)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if speedups["m"]:
        ms, s = zip(*sorted(speedups["m"]))
        a1.plot(ms, s, "o-", color="C0")
    a1.set(xscale="log", yscale="log", xlabel="m (number of losses)", ylabel="speedup over torchjd 0.18 (×)",
           title="GradVacWeighting: the loop on the Gramian")
    ns = sorted({n for _, n, _ in speedups["n"]})
    for m in sorted({m for m, _, _ in speedups["n"]}):
        pts = sorted((n, s) for mm, n, s in speedups["n"] if mm == m)
        a2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"m = {m}")
    a2.set(xscale="log", yscale="log", xlabel="n (number of parameters)", ylabel="speedup over torchjd 0.18 (×)",
           title="GradVac aggregator end to end")
    if ns:
        a2.xaxis.set_major_locator(FixedLocator(ns))
        a2.xaxis.set_minor_locator(NullLocator())
        a2.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e+0", "e")))
    for ax in (a1, a2):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="1× (parity)")
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.5), max(hi, 2.0))
        ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if min(lo, 0.5) <= t <= max(hi, 2)]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="major", alpha=0.3)
    if speedups["m"]:
        a1.xaxis.set_major_locator(FixedLocator(sorted(m for m, _ in speedups["m"])))
        a1.xaxis.set_minor_locator(NullLocator())
    a1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a2.legend(fontsize=8)
    return save_figure(fig, path, f"fusedjd speedup, {device_name}", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--full", action="store_true", help="run the full grid")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before timing")
    ap.add_argument("--save", action="store_true",
                    help="write to bench/results/<device>.md (the committed snapshot) instead of bench/results/local/")
    ap.add_argument("--out", default=None, help="results file (overrides the two above)")
    ap.add_argument("--tiny", action="store_true",
                    help="the GPU grid's code on a tiny grid (n = 1e4), on the CPU unless --device cuda")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="GPU grid: seconds for the whole run (default 240; 60 with --tiny)")
    ap.add_argument("--torchjd-max-s", type=float, default=1.0,
                    help="GPU grid: torchjd's GradVac is timed only where a call is expected to take less")
    args = ap.parse_args()
    auto = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    device = args.device if args.device != "auto" else auto
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
        if not fusedjd.ops.has_cuda_kernels():
            sys.exit("--device cuda: this fusedjd build has no CUDA kernels (rebuild with a CUDA torch)")
        device_name = torch.cuda.get_device_name()
        tag = "cuda-" + device_name.replace("NVIDIA ", "").split()[0].lower()
    else:
        device_name = f"CPU: {platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads"
        tag = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" or args.tiny:
        folder = os.path.join(HERE, "results") if args.save else os.path.join(HERE, "results", "local")
        out = args.out or os.path.join(folder, f"{tag if device == 'cuda' else 'cpu'}{'-tiny' if args.tiny else ''}.md")
        return gpu_grid.main(args, device, *gpu_extras(device, args.tiny), out)
    load = os.getloadavg()[0]
    busy = load > (os.cpu_count() or 1)
    if busy:
        print(f"note: load average {load:.1f} is above the {os.cpu_count()} cores: timings will stall and spread",
              file=sys.stderr)
    print(f"[bench] the floors' probes (bench/probes.cpp) for the {probes.load()} CPU kernels: ready", file=sys.stderr)
    gram, loops, agg, moco, train = configs(device, args.full)
    run = Run(device, Progress(len(gram) + 2 * len(loops) + 2 * len(PROJECTOR_MS) + len(agg) + len(moco) + TRAIN_ROWS))
    tables = [
        bench_jac_to_grad(run, train),
        bench_gramian(run, gram),
        bench_loops(run, loops),
        bench_aggregators(run, agg),
        bench_moco(run, moco),
        # after the small rows: torchjd's quadprog goes through numpy, whose idle BLAS threads then
        # spin on the cores for a while (they made the next few microsecond-rows 50 % slower)
        bench_projector(run, PROJECTOR_MS),
        bench_training(run, train),
    ]
    sync(device)
    header = [
        f"# fusedjd benchmark — {device_name}",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- torch {torch.__version__}, torchjd {importlib.metadata.version('torchjd')}, fusedjd {fusedjd.__version__} "
        f"(CPU kernels: {fusedjd.build_info()['cpu_capability']}), Python {platform.python_version()}",
        f"- command: `python bench/run.py {' '.join(sys.argv[1:])}`".rstrip(),
        "- time / floor: each row's floor is the larger of its read floor (the row's passes over its own tensors, "
        "timed with the fastest read, fusedjd_bench.read or torch.sum, in the row's cache state) and, for m ≥ 16, "
        "its multiply-add floor (m(m+1)/2 per column, + m for a combination, at the rate of the Gramian engine's "
        "own register blocks on rows of the row's dtype in L1: fusedjd_bench.multiply_adds), both measured right "
        "before and right after the row (the better of the two); marked (madds) where the multiply-adds bind. "
        "At n ≤ 1e4 a read floor is mostly one call's fixed cost (a few µs). Reads ran at "
        f"{min(run.bandwidths) / 1e9:.0f}–{max(run.bandwidths) / 1e9:.0f} GB/s (in cache or streamed) over this "
        "run" + (f"; the register blocks at {min(run.peaks) / 1e9:.0f}–{max(run.peaks) / 1e9:.0f} G float32 "
                 "multiply-adds/s" if run.peaks else ""),
        f"- load average at start: {load:.1f} on {os.cpu_count()} cores"
        + (" (ABOVE the core count: timings stall and spread)" if busy else ""),
        "",
        "",
    ]
    report = "\n".join(header) + "\n".join(t.markdown() for t in tables)
    folder = os.path.join(HERE, "results") if args.save else os.path.join(HERE, "results", "local")
    out = args.out or os.path.join(folder, f"{tag}{'-full' if args.full else ''}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    png = plot(run.speedups, os.path.splitext(out)[0] + ".png", device_name)
    if png:
        report += f"\n![speedup]({os.path.basename(png)})\n"
    with open(out, "w") as fh:
        fh.write(report)
    print(report)
    print(f"results written to {out}" + (f" and {png}" if png else " (no plot: matplotlib not installed)"))
    if run.mismatches:
        print("MISMATCHES:\n  " + "\n  ".join(run.mismatches))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
