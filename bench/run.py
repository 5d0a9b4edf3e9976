"""fusedjd benchmark: fusedjd against torchjd 0.18 and plain PyTorch, on a grid per device.

    python bench/run.py               # the CPU grid, a few minutes on a 2-core CPU
    python bench/run.py --full        # the full CPU grid
    python bench/run.py --device cuda # the CUDA grid, about 4 minutes on an H100 or H200
    python bench/run.py --tiny        # the CUDA grid's code on a tiny grid, on the CPU (a dry run)

Every row checks fusedjd's result against the baseline (or fusedjd.reference) before it times
anything; a row whose check fails is marked MISMATCH and the run exits non-zero. Times are
medians (CUDA events on a GPU).

The CPU grid: time / floor divides by the larger of the time of reading the row's own tensors (as
many passes as the op makes, with the fastest read, in the row's cache state) and, for m >= 16, of
its multiply-adds at the rate the Gramian engine's register blocks reach in L1, both measured
right before and right after the row is timed (on a shared machine they move within a run).

The CUDA grid (CUDA_GRID): n = 1e7 and 1e8, m from 2 to 64, float32 and bfloat16; the Gramian,
the combination, the GradVac aggregator (torchjd's timed only where a call is expected to take
less than --torchjd-max-s: its pairwise loop runs on the host) and the MoCo step; then, while the
time budget lasts, eager calls against CUDA-graph replays and the CPU grid's loops and training
steps. Floors, measured at the start and again at the end: a device copy (bytes read + written)
and a read-only kernel (torch.sum, torch.amax), the faster bandwidth of the two; float32
multiply-adds at cuBLAS' rate on a square product (TF32 off). A row's floor is the larger of its
bytes over that bandwidth and its multiply-adds over that rate. The L2 cache is flushed before
every timed call. Each row is checked against its baseline on the device at its n, and each
(m, dtype) once against fusedjd.reference in float64 at a small n. Rows that do not fit in the free
memory are skipped, saying so; the sections share --budget-s, each its share of what is left, and
each table is written as soon as its section ends, so a run cut short keeps the finished tables.

The markdown tables are printed and written, with a speedup plot when matplotlib is installed,
to bench/results/local/ (not tracked); --save writes them to bench/results/ instead, the
snapshot the README shows.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torchjd import aggregation as ta
from torchjd import linalg as ta_linalg
from torchjd.autogram import Engine
from torchjd.autojac import jac_to_grad, mtl_backward

import fusedjd
import probes  # bench/probes.py: the floors' kernels, built for the CPU level loaded here
from common import (Floors, Progress, Table, fmt_mib, fmt_time, fmt_x, measure_floors,  # bench/ is sys.path[0]
                    median_time, peak_bytes, rel_err_here, save_figure, sync)
from fusedjd import ops, reference

HERE = os.path.dirname(os.path.abspath(__file__))


class PlainMoCo(ta.Aggregator):
    """MoCo written as tightly as plain PyTorch allows (default hyper-parameters, softmax), as a
    torchjd aggregator so that jac_to_grad takes it: ``Y.lerp_(J, b)`` in place, then
    ``λ = softmax(λ − c (Y Yᵀ) λ)`` and ``λᵀ Y``; ``λ`` in float32 for half-precision ``J``."""

    def __init__(self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5):
        super().__init__()
        self.hyper = (beta, beta_sigma, gamma, gamma_sigma)
        self.Y = None

    def forward(self, J):
        beta, beta_sigma, gamma, gamma_sigma = self.hyper
        if self.Y is None or self.Y.shape != J.shape or self.Y.dtype != J.dtype or self.Y.device != J.device:
            self.Y = torch.zeros_like(J)
            self.lam = torch.full((J.shape[0],), 1.0 / max(J.shape[0], 1), dtype=ops.acc_dtype(J.dtype),
                                  device=J.device)
            self.k = 0
        self.k += 1
        b, c = beta / self.k**beta_sigma, gamma / self.k**gamma_sigma
        self.Y.lerp_(J, b)
        self.lam = torch.softmax(self.lam - c * ((self.Y @ self.Y.T).to(self.lam.dtype) @ self.lam), 0)
        return self.lam.to(self.Y.dtype) @ self.Y


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

    def check(self, label: str, got: torch.Tensor, expected: torch.Tensor, tol: float, show: bool = False) -> str:
        """"ok" or "MISMATCH" (with the relative error when ``show``), computed on ``got``'s device."""
        return self.verdict(label, rel_err_here(got, expected), tol, show)

    def verdict(self, label: str, err: float, tol: float, show: bool = False) -> str:
        if not err < tol:
            self.mismatches.append(f"{label}: relative error {err:.2e} > {tol:.0e}")
            return f"MISMATCH ({err:.1e})" if show else "MISMATCH"
        return f"ok ({err:.0e})" if show else "ok"

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


# UPGrad's projector at batch size: the targets of its m right-hand sides (2 threads), and DualProj's
# one right-hand side at m = 256
PROJECTOR_TARGETS = {64: 0.5e-3, 128: 3e-3, 256: 15e-3, 512: 100e-3}
DUALPROJ_TARGET = (256, 0.2e-3)


def projector_gramian(family: str, m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The Gramian of a random J of one of torchjd's matrix families: "normal" (n = 2 m) or "weak"
    (strictly weakly stationary: a non-negative combination of the rows, with zeros, vanishes)."""
    gen = torch.Generator().manual_seed(m)
    if family == "normal":
        J = torch.randn(m, 2 * m, generator=gen, dtype=torch.float64)
    else:
        w = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
        w[: m // 3] = 0.0
        A = torch.randn(m, max(1, m // 2), generator=gen, dtype=torch.float64)
        J = A - torch.outer(w, w @ A) / (w @ w)
    return (J @ J.T).to(device=device, dtype=dtype)


def kkt_residual(V: torch.Tensor, U: torch.Tensor, G: torch.Tensor, projector: fusedjd.Projector) -> float:
    """The largest KKT residual (fusedjd.reference.dual_cone_kkt) of the projections V (rows) of U on
    the Gramian the projector solves (trace-normalised, reg_eps I added), in float64; NaN stays."""
    G = G.double()
    trace = G.trace()
    G = (G / trace if trace >= projector.norm_eps else torch.zeros_like(G)) + projector.reg_eps * torch.eye(
        G.shape[0], dtype=G.dtype, device=G.device)
    residuals = reference.dual_cone_kkt(V, U, G)
    return math.nan if any(math.isnan(r) for r in residuals) else max(residuals)


def bench_projector(run: Run, ms: list[int]):
    """The dual-cone projector on UPGrad's m right-hand sides (U = I) and DualProj's one (the mean):
    fusedjd.Projector (the dual_cone op) against torchjd 0.18's default, quadprog through numpy, on
    Gramians of two of torchjd's matrix families in float32 and float64. The check: equal to
    quadprog (1e-9 in float64, 1e-5 in float32) where quadprog ran, and the KKT conditions within
    1e-12 (float64) or 1e-6 (float32: the weights' rounding) everywhere."""
    device = run.device
    ours, theirs = fusedjd.Projector(), ta_linalg.QuadprogProjector()
    t = Table("UPGrad / DualProj projector at batch size: fusedjd.Projector vs torchjd's quadprog "
              f"({torch.get_num_threads()} threads)",
              ["family", "dtype", "m", "check (KKT residual)", "UPGrad: fusedjd", "target", "quadprog", "speedup",
               "DualProj: fusedjd", "quadprog", "speedup"])
    for family in ("normal", "weak"):
        for dtype in (torch.float32, torch.float64):
            for m in ms:
                G = projector_gramian(family, m, dtype, device)
                cells = []
                worst = 0.0
                for U, quadprog_up_to in ((torch.eye(m, dtype=dtype, device=device), 128),
                                          (torch.full((1, m), 1.0 / m, dtype=dtype, device=device), 512)):
                    V = ours(U, G)
                    residual = kkt_residual(V, U, G, ours)
                    worst = residual if not residual <= worst else worst  # (a NaN stays)
                    tf = median_time(lambda: ours(U, G), device, budget_s=1.0 if m >= 256 else 0.4)
                    tt = None
                    if m <= quadprog_up_to:
                        expected = theirs(U, G)
                        run.check(f"Projector {family} {dtype} m={m}", V, expected,
                                  1e-9 if dtype == torch.float64 else 1e-5)
                        tt = median_time(lambda: theirs(U, G), device, budget_s=1.0, min_reps=1)
                    cells.append((tf, tt))
                # (the weights are rounded to G's dtype: float32 holds the conditions to its own rounding)
                status = run.verdict(f"Projector KKT {family} {dtype} m={m}", worst,
                                     1e-12 if dtype == torch.float64 else 1e-6, show=True)
                (tf, tt), (tf1, tt1) = cells
                target = PROJECTOR_TARGETS.get(m)
                t.rows.append([family, str(dtype).replace("torch.", ""), str(m), status, fmt_time(tf),
                               f"≤ {fmt_time(target)}" if target else "—",
                               fmt_time(tt) if tt else "not run (seconds)", fmt_x(tt / tf) if tt else "—",
                               fmt_time(tf1) + (f" (target ≤ {fmt_time(DUALPROJ_TARGET[1])})"
                                                if m == DUALPROJ_TARGET[0] else ""),
                               fmt_time(tt1) if tt1 else "—", fmt_x(tt1 / tf1) if tt1 else "—"])
                run.progress.step(f"Projector {family} {dtype} m={m}")
    return t


class SmallCNN(nn.Module):
    """Two convolutions and two linear layers on 1 x 28 x 28 inputs, 10 classes."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def bench_iwrm(run: Run, ms: list[int]):
    """The instance-wise (IWRM) training step of torchjd's documented recipe: one loss per sample,
    the Gramian from torchjd's autogram Engine, UPGradWeighting's weights, losses.backward(weights),
    SGD; torchjd's UPGradWeighting (quadprog) against fusedjd's, on a small CNN and an MLP, m = the
    batch size."""
    device = run.device
    t = Table("Instance-wise training step (IWRM, torchjd's autogram recipe): torchjd's UPGradWeighting vs fusedjd's",
              ["model", "m", "check", "forward + compute_gramian", "weighting: torchjd", "fusedjd", "speedup",
               "step: torchjd", "fusedjd", "speedup", "weighting / fusedjd step"])
    for name in ("CNN", "MLP"):
        for m in ms:
            torch.manual_seed(m)
            if name == "CNN":
                model, x = SmallCNN().to(device), torch.randn(m, 1, 28, 28, device=device)
            else:
                model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                      nn.Linear(256, 10)).to(device)
                x = torch.randn(m, 784, device=device)
            y = torch.randint(0, 10, (m,), device=device)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            engine = Engine(model, batch_dim=0)

            def gramian():
                losses = nn.functional.cross_entropy(model(x), y, reduction="none")
                return losses, engine.compute_gramian(losses)

            def step(weighting):
                def one_step():
                    losses, G = gramian()
                    opt.zero_grad()
                    losses.backward(weighting(G))
                    opt.step()
                return one_step

            ours, theirs = fusedjd.UPGradWeighting(), ta.UPGradWeighting()
            G = gramian()[1].detach()
            slow = m > 256  # torchjd's weighting takes about a minute at m = 512
            status = "not run (minutes)" if slow else run.check(f"IWRM {name} m={m}", ours(G), theirs(G), 1e-4)
            tg = median_time(lambda: gramian(), device, budget_s=0.5)
            tf = median_time(lambda: ours(G), device, budget_s=0.5)
            sf = median_time(step(ours), device, budget_s=0.5)
            tt = st = None
            if not slow:
                tt = median_time(lambda: theirs(G), device, budget_s=0.5, min_reps=1)
                st = median_time(step(theirs), device, budget_s=0.5, min_reps=1)
            t.rows.append([name, str(m), status, fmt_time(tg), fmt_time(tt) if tt else "—", fmt_time(tf),
                           fmt_x(tt / tf) if tt else "—", fmt_time(st) if st else "—", fmt_time(sf),
                           fmt_x(st / sf) if st else "—", f"{100 * tf / sf:.0f} %"])
            run.progress.step(f"IWRM {name} m={m}")
    return t


def bench_weightings(run: Run, ms: list[int]):
    """The solver weightings that torchjd runs as Python loops on the host (MGDA's Frank–Wolfe
    iteration: it reads tensor values at every iteration): fusedjd's kernel against torchjd 0.18, on
    the float32 Gramian of a random m × 4m Jacobian (the issue's grid). The check: equal to torchjd's
    iteration run in float64 on the same Gramian (fusedjd iterates in float64) within 1e-6."""
    device = run.device
    t = Table("Solver weightings (float32 Gramian of a random m × 4m J): fusedjd vs torchjd 0.18",
              ["weighting", "m", "check", "fusedjd", "torchjd", "speedup"])
    for m in ms:
        J = torch.randn(m, 4 * m, device=device, generator=torch.Generator(device).manual_seed(m))
        G = J @ J.T
        ours, theirs = fusedjd.MGDAWeighting(), ta.MGDAWeighting()
        status = run.check(f"MGDAWeighting m={m}", ours(G), theirs(G.double()), 1e-6)
        tf = median_time(lambda: ours(G), device)
        tt = median_time(lambda: theirs(G), device, budget_s=0.5, min_reps=2)
        t.rows.append(["MGDAWeighting", str(m), status, fmt_time(tf), fmt_time(tt), fmt_x(tt / tf)])
        run.progress.step(f"MGDAWeighting m={m}")
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
    """The CPU grid (the CUDA grid: CUDA_GRID)."""
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


PROJECTOR_MS = [8, 32, 64, 128, 256, 512]
WEIGHTING_MS = [4, 8, 16, 32, 64]
IWRM_MS = [32, 64, 128, 256, 512]


TRAIN_ROWS = 5 + 3  # the rows of bench_training and bench_jac_to_grad


# ---- the CUDA grid ------------------------------------------------------------------------------

F32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class Grid:
    """The CUDA grid's sizes and what its run spends."""

    ns: tuple[int, ...]
    ms: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    n_check: int  # n of the float64 reference checks
    fn_budget_s: float  # timing budget of one function in one row
    floor_elems: int  # float32 elements of the floors' buffers
    gemm: int  # side of the square product that measures the multiply-add rate
    flush_bytes: int  # zeroed before every timed call: larger than the L2 cache
    budget_s: float  # --budget-s by default
    graph_ns: tuple[int, ...]  # n of the eager-against-replay rows (m = 8)
    loops: tuple[LoopCase, ...]
    train: TrainCase


CUDA_GRID = Grid(ns=(10**7, 10**8), ms=(2, 8, 16, 32, 64), dtypes=(F32, BF16), n_check=10**5, fn_budget_s=0.1,
                 floor_elems=2**28, gemm=8192, flush_bytes=256 * 2**20, budget_s=240.0, graph_ns=(10**5, 10**7),
                 loops=(LoopCase(2, True), LoopCase(8, True), LoopCase(32, True), LoopCase(64, False),
                        LoopCase(256, False)),
                 train=TrainCase(512, 1024, 8, 256))
TINY_GRID = Grid(ns=(10**4,), ms=(2, 8), dtypes=(F32, BF16), n_check=10**3, fn_budget_s=0.01, floor_elems=2**24,
                 gemm=512, flush_bytes=4 * 2**20, budget_s=60.0, graph_ns=(10**4,),
                 loops=(LoopCase(2, True), LoopCase(8, True)), train=TrainCase(32, 64, 3, 16))


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class GridRun(Run):
    """A run of the CUDA grid: its floors, the cache flush, the time budget, the output file that
    every finished table is appended to."""

    grid: Grid = CUDA_GRID
    floors: Floors | None = None
    flush: torch.Tensor | None = None
    out: str = ""
    budget_s: float = 240.0
    torchjd_max_s: float = 1.0
    torchjd_pair_s: float = 1.2e-4  # torchjd GradVac's host loop, seconds per pair (learned as rows run)
    errors: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def emit(self, text: str) -> None:
        """Printed and appended to the output file at once (a run cut short keeps what it wrote)."""
        print(text, flush=True)
        with open(self.out, "a") as fh:
            fh.write(text + "\n")

    def randn(self, m: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.randn(m, n, dtype=dtype, device=self.device)

    def free_bytes(self) -> int:
        """Free device memory once the allocator's cache is released (on the CPU: available memory)."""
        sync(self.device)
        if self.device == "cuda":
            torch.cuda.empty_cache()
            return torch.cuda.mem_get_info()[0]
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def time(self, fn, min_reps: int = 3, max_reps: int = 100, warmup: bool = True) -> float:
        return median_time(fn, self.device, self.grid.fn_budget_s, min_reps, max_reps, warmup, self.flush)

    def timed_cells(self, fn, nbytes: float, fmas: float) -> tuple[float, list[str]]:
        """fn's median time, and its cells: time, GB/s, the floor (and what binds it), time / floor."""
        t = self.time(fn)
        t_mem, t_fma = nbytes / self.floors.bw, fmas / self.floors.fma_rate
        floor, bound = (t_mem, "memory") if t_mem >= t_fma else (t_fma, "multiply-adds")
        return t, [fmt_time(t), f"{nbytes / t / 1e9:,.0f}", f"{fmt_time(floor)} ({bound})", f"{t / floor:.2f}"]


def gramian_row(b: GridRun, m: int, n: int, dtype: torch.dtype) -> list[str]:
    J = b.randn(m, n, dtype, seed=m + n)
    fused, base = (lambda: ops.gramian(J, [n])), (lambda: J @ J.T)
    check = b.check(f"gramian m={m} n={nice_n(n)} {dname(dtype)} vs J @ J.T", fused()[0], base(),
                    1e-3 if dtype == F32 else 2e-2, show=True)
    t, cells = b.timed_cells(fused, J.element_size() * m * n, m * (m + 1) / 2 * n)
    tb = b.time(base)
    return [check] + cells + [fmt_time(tb), fmt_x(tb / t)]


def gramian_check(b: GridRun, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m)
    return b.check(f"gramian m={m} n={n} {dname(dtype)} vs float64 reference", ops.gramian(J, [n]),
                   reference.gramian(J, [n]), 10 * reference.TOLERANCE["gramian"][dtype], show=True)


def combine_row(b: GridRun, m: int, n: int, dtype: torch.dtype) -> list[str]:
    J = b.randn(m, n, dtype, seed=m + n + 1)
    w = torch.randn(1, m, device=b.device)
    wj = w[0].to(dtype)
    fused, base = (lambda: ops.combine(J, w, [n])), (lambda: wj @ J)
    check = b.check(f"combine m={m} n={nice_n(n)} {dname(dtype)} vs w @ J", fused(), base(),
                    1e-4 if dtype == F32 else 2e-2, show=True)
    t, cells = b.timed_cells(fused, J.element_size() * (m + 1) * n, m * n)
    tb = b.time(base)
    return [check] + cells + [fmt_time(tb), fmt_x(tb / t)]


def combine_check(b: GridRun, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m + 1)
    w = torch.randn(2, m, device=b.device)
    sizes = [n // 3, n - n // 3]
    return b.check(f"combine m={m} n={n} {dname(dtype)} vs float64 reference", ops.combine(J, w, sizes),
                   reference.combine(J, w, sizes), 10 * reference.TOLERANCE["combine"][dtype], show=True)


def gradvac_row(b: GridRun, m: int, n: int, dtype: torch.dtype) -> list[str]:
    J = b.randn(m, n, dtype, seed=m + n + 2)
    nbytes = 2 * J.element_size() * m * n
    torch.manual_seed(0)
    ours = fusedjd.GradVac()
    first = ours(J).clone()  # (a later call may reuse its memory)
    t, cells = b.timed_cells(lambda: ours(J), nbytes, (m * (m + 1) / 2 + m) * n)
    reads = nbytes / b.floors.bw
    estimate = b.torchjd_pair_s * m * (m - 1) + 10 * reads
    if estimate > b.torchjd_max_s:
        return ["not compared (torchjd not run)"] + cells + [
            f"not run: ~{fmt_time(estimate)} a call (estimated), over --torchjd-max-s", "—"]
    got: list = []
    Jc = J if dtype == F32 else J.float()  # torchjd computes in J's dtype: check it in float32
    torch.manual_seed(0)
    try:  # torchjd's first call, under the seed of fusedjd's first call: the check, and the estimate
        t1 = b.time(lambda: got.append(ta.GradVac()(Jc)), min_reps=1, max_reps=1, warmup=False)
        check = b.check(f"GradVac m={m} n={nice_n(n)} {dname(dtype)} vs torchjd on float32 (first call, same seed)",
                        first, got.pop(), 1e-3 if dtype == F32 else 2e-2, show=True)
        del Jc
        theirs = ta.GradVac()
        calls = max(1, min(5, int(1.5 * b.torchjd_max_s / max(t1, 1e-6))))
        tt = b.time(lambda: theirs(J), min_reps=min(3, calls), max_reps=calls, warmup=dtype != F32)
    except Exception as e:  # torchjd may refuse a dtype
        return ["—"] + cells + [f"torchjd failed: {type(e).__name__}: {str(e)[:60]}", "—"]
    if m >= 8:  # (at m = 2 torchjd's fixed cost per call dominates: it says little about the pairs)
        b.torchjd_pair_s = max(1e-6, (tt - 10 * reads) / (m * (m - 1)))
    if dtype == F32:
        b.speedups["n"].append((m, n, tt / t))
    note = "" if calls >= 3 else f" ({calls} call{'s' if calls > 1 else ''})"
    return [check] + cells + [fmt_time(tt) + note, fmt_x(tt / t)]


def gradvac_check(b: GridRun, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m + 2)
    torch.manual_seed(11)
    perms = ops.draw_perms(1, m, pcgrad=False)
    torch.manual_seed(11)
    got = fusedjd.GradVac()(J)
    W = reference.gradvac_loop(reference.gramian(J, [n]), perms, torch.zeros(1, m, m, dtype=torch.float64), 0.5, 1e-8)
    return b.check(f"GradVac m={m} n={n} {dname(dtype)} vs float64 reference", got, reference.combine(J, W, [n]),
                   1e-3 if dtype == F32 else 2e-2, show=True)


def moco_row(b: GridRun, m: int, n: int, dtype: torch.dtype) -> list[str]:
    # gradient-sized rows (|g_i| ~ 1): the softmax stays well conditioned
    J = b.randn(m, n, dtype, seed=m + n + 3).mul_(1 / math.sqrt(n))
    size = J.element_size() * m * n
    ours = fusedjd.MoCo()
    first = ours(J).clone()  # (a later call may reuse its memory)
    mem = f"{peak_bytes(lambda: ours(J), b.device) / size:.2f}" if b.device == "cuda" else "—"
    t, cells = b.timed_cells(lambda: ours(J), 5 * size, (m * (m + 1) / 2 + m) * n)
    del ours
    b.free_bytes()
    plain = PlainMoCo()
    check = b.check(f"MoCo m={m} n={nice_n(n)} {dname(dtype)} vs plain PyTorch MoCo (first step)", first, plain(J),
                    1e-3 if dtype == F32 else 6e-2, show=True)
    del first
    if b.device == "cuda":
        mem += f" / {peak_bytes(lambda: plain(J), b.device) / size:.2f}"
    tp = b.time(lambda: plain(J))
    return [check] + cells + [fmt_time(tp), fmt_x(tp / t), mem]


def moco_check(b: GridRun, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m + 3).mul_(1 / math.sqrt(n))
    ours, ref = fusedjd.MoCo(), reference.MoCo()
    worst = max(rel_err_here(ours(J), ref(J)[1]) for _ in range(3))
    tol = 1e-4 if dtype == F32 else reference.TOLERANCE["moco"][dtype]
    return b.verdict(f"MoCo m={m} n={n} {dname(dtype)} vs float64 reference (3 steps)", worst, tol, show=True)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    columns: list[str]  # after m, n, dtype and the float64 check
    row: Callable  # (run, m, n, dtype) -> cells
    mem_factor: float  # bytes needed / bytes of J
    check: Callable  # (run, m, dtype) -> the float64 reference check's cell, at a small n


TIMING = ["fusedjd", "GB/s", "floor (bound)", "time / floor"]
SECTIONS = [
    Section("Gramian", "Gramian: fusedjd.ops.gramian vs torch `J @ J.T` (floor: one read of J)",
            ["check vs J @ J.T (this n)"] + TIMING + ["torch J @ J.T", "speedup"], gramian_row, 1.05, gramian_check),
    Section("combine", "Combine: fusedjd.ops.combine vs torch `w @ J` (floor: one read of J, one write of n)",
            ["check vs w @ J (this n)"] + TIMING + ["torch w @ J", "speedup"], combine_row, 1.1, combine_check),
    Section("GradVac", "GradVac aggregator: fusedjd.GradVac vs torchjd 0.18 GradVac (floor: two reads of J)",
            ["check vs torchjd in float32 (this n)"] + TIMING + ["torchjd", "speedup"], gradvac_row, 3.2,
            gradvac_check),
    Section("MoCo", "MoCo step: fusedjd.MoCo vs plain PyTorch MoCo (`Y.lerp_(J, b)`, `Y @ Y.T`, softmax, `λ @ Y`; "
            "floor: five passes over J's size)",
            ["check vs plain (this n, first step)"] + TIMING + ["plain PyTorch", "speedup",
                                                                 "peak extra memory fusedjd / plain (× J)"],
            moco_row, 2.2, moco_check),
]


def run_section(b: GridRun, sec: Section, deadline: float) -> Table:
    t = Table(sec.title, ["m", "n", "dtype", "check (small n, float64)"] + sec.columns)
    checks: dict = {}
    for n in b.grid.ns:
        for dtype in b.grid.dtypes:
            for m in b.grid.ms:
                head = [str(m), nice_n(n), dname(dtype)]
                need = sec.mem_factor * torch.empty((), dtype=dtype).element_size() * m * n
                free = b.free_bytes()
                if time.perf_counter() > deadline:
                    skip = "skipped: this section's share of --budget-s is spent"
                elif need > 0.92 * free:
                    skip = f"skipped: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
                else:
                    skip = None
                try:
                    if skip is None:
                        if (m, dtype) not in checks:
                            checks[m, dtype] = sec.check(b, m, dtype)
                        cells = sec.row(b, m, n, dtype)
                        t.rows.append(head + [checks[m, dtype]] + cells)
                        b.log(f"{sec.name} m={m} n={nice_n(n)} {dname(dtype)}: {' | '.join(cells[1:5])}")
                        continue
                except Exception as e:  # one row's failure (say, out of memory) is reported, not fatal
                    skip = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                    b.errors.append(f"{sec.name} m={m} n={nice_n(n)} {dname(dtype)}: {skip}")
                    traceback.print_exc()
                t.rows.append(head + [skip] + ["—"] * len(sec.columns))
    b.free_bytes()
    return t


def bench_graphs(run: Run, ns: tuple[int, ...]) -> Table:
    """One step called eagerly against its replay from a captured CUDA graph: what a graph saves of
    the host's work per step (on the CPU, which has no graphs, the eager time alone)."""
    device = run.device
    t = Table("CUDA graphs: one step called eagerly vs replayed from a captured graph (fp32, m = 8)",
              ["aggregator", "n", "eager", "graph replay", "speedup"])
    for n in ns:
        for name, make in [('GradVac(draws="device")', lambda: fusedjd.GradVac(draws="device")),
                           ("MoCo", fusedjd.MoCo)]:
            agg, J = make(), torch.randn(8, n, device=device)
            step = lambda agg=agg, J=J: agg(J)  # noqa: E731
            te, tg = median_time(step, device), None
            if device == "cuda":  # (captured after the eager calls: their lazy set-up is done)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                tg = median_time(graph.replay, device)
            t.rows.append([name, nice_n(n), fmt_time(te), fmt_time(tg) if tg else "— (no CUDA graphs on the CPU)",
                           fmt_x(te / tg) if tg else "—"])
            run.progress.step(f"graph {name} n={nice_n(n)}")
    return t


def run_grid(args, device: str, device_name: str, out: str) -> int:
    """The CUDA grid on ``device`` (the CPU with --tiny), each table appended to ``out`` as it ends;
    then the extras while --budget-s lasts. Returns the exit status (1 on a mismatch or an error)."""
    grid = TINY_GRID if args.tiny else CUDA_GRID
    budget = args.budget_s if args.budget_s is not None else grid.budget_s
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        hw = (f"{p.multi_processor_count} SMs, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), "
              f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    else:
        hw = f"{os.cpu_count()} cores"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    open(out, "w").close()
    t0 = time.perf_counter()
    flush = torch.empty(grid.flush_bytes // 4, device=device)
    floors = measure_floors(device, grid.floor_elems, grid.gemm, flush)
    b = GridRun(device, Progress(2 * len(grid.graph_ns) + 2 * len(grid.loops) + TRAIN_ROWS), grid=grid,
                floors=floors, flush=flush, out=out, budget_s=budget, torchjd_max_s=args.torchjd_max_s, t0=t0)
    b.emit("\n".join([
        f"# fusedjd benchmark, CUDA grid{' (tiny, a dry run)' if args.tiny else ''} — {device_name}",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; {hw}",
        f"- torch {torch.__version__}, torchjd {importlib.metadata.version('torchjd')}, fusedjd {fusedjd.__version__} "
        f"({fusedjd.build_info()}), Python {platform.python_version()}",
        f"- command: `python bench/run.py {' '.join(sys.argv[1:])}`",
        f"- floors at the start: {floors.describe()}",
        "- time / floor: median time over max(bytes / floor bandwidth, multiply-adds / rate); the cache flushed "
        f"({grid.flush_bytes / 2**20:.0f} MiB written) before every timed call",
        f"- time budget: {budget:.0f} s over the four sections (each its share of what is left), then the extras",
        "",
    ]))
    b.log(f"floors: {floors.describe()}")
    for i, sec in enumerate(SECTIONS):
        share = max(budget - b.elapsed(), 0) / (len(SECTIONS) - i)
        b.log(f"section {sec.name}: {share:.0f} s")
        b.emit(run_section(b, sec, time.perf_counter() + share).markdown())
    extras = [
        ("CUDA graphs: eager against replay", lambda: bench_graphs(b, grid.graph_ns)),
        ("GradVac / PCGrad loop on the Gramian", lambda: bench_loops(b, list(grid.loops))),
        ("Training step with jac_to_grad", lambda: bench_jac_to_grad(b, grid.train)),
        ("Training step through torchjd's jac_to_grad", lambda: bench_training(b, grid.train)),
    ]
    for name, make in extras:
        left = budget - b.elapsed()
        if left < (2 if args.tiny else 20):
            b.emit(f"### {name}\n\nnot run: {max(left, 0):.0f} s of --budget-s left\n")
            continue
        b.log(f"extra: {name} ({left:.0f} s left)")
        try:
            b.emit(make().markdown())
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            b.errors.append(f"{name}: {msg}")
            traceback.print_exc()
            b.emit(f"### {name}\n\nerror: {msg}\n")
        b.free_bytes()
    tail = [f"- floors at the end: {measure_floors(device, grid.floor_elems, grid.gemm, flush).describe()}",
            f"- total time: {b.elapsed():.0f} s"]
    png = plot(b.speedups, os.path.splitext(out)[0] + ".png", device_name)
    if png:
        tail.append(f"\n![speedup]({os.path.basename(png)})")
    if b.mismatches:
        tail.append("\nMISMATCHES:\n" + "\n".join(f"- {x}" for x in b.mismatches))
    if b.errors:
        tail.append("\nERRORS:\n" + "\n".join(f"- {x}" for x in b.errors))
    b.emit("\n".join(tail))
    print(f"results written to {out}" + (f" and {png}" if png else " (no plot: matplotlib not installed)"))
    return 1 if b.mismatches or b.errors else 0


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
                    help="the CUDA grid's code on a tiny grid (n = 1e4), on the CPU unless --device cuda")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="CUDA grid: seconds for the whole run (default 240; 60 with --tiny)")
    ap.add_argument("--torchjd-max-s", type=float, default=1.0,
                    help="CUDA grid: torchjd's GradVac is timed only where a call is expected to take less")
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
        return run_grid(args, device, device_name, out)
    load = os.getloadavg()[0]
    busy = load > (os.cpu_count() or 1)
    if busy:
        print(f"note: load average {load:.1f} is above the {os.cpu_count()} cores: timings will stall and spread",
              file=sys.stderr)
    print(f"[bench] the floors' probes (bench/probes.cpp) for the {probes.load()} CPU kernels: ready", file=sys.stderr)
    gram, loops, agg, moco, train = configs(device, args.full)
    run = Run(device, Progress(len(gram) + 2 * len(loops) + 4 * len(PROJECTOR_MS) + 2 * len(IWRM_MS) + len(WEIGHTING_MS)
                               + len(agg) + len(moco) + TRAIN_ROWS))
    tables = [
        bench_jac_to_grad(run, train),
        bench_gramian(run, gram),
        bench_loops(run, loops),
        bench_aggregators(run, agg),
        bench_moco(run, moco),
        bench_weightings(run, WEIGHTING_MS),
        # after the small rows: torchjd's quadprog goes through numpy, whose idle BLAS threads then
        # spin on the cores for a while (they made the next few microsecond-rows 50 % slower)
        bench_projector(run, PROJECTOR_MS),
        bench_iwrm(run, IWRM_MS),
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
