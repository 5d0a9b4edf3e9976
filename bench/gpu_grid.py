"""The GPU benchmark of bench/run.py (``--device cuda``), and its dry run on the CPU (``--tiny``).

    python bench/run.py --device cuda --out cuda.md   # the grid below, about 4 minutes on an H200
    python bench/run.py --tiny                        # the same code on a tiny grid, on the CPU

Grid: n = 1e7 and 1e8, m in {2, 8, 16, 32, 64}, float32 and bfloat16, in four sections:

- Gramian: ``fusedjd.ops.gramian`` against ``J @ J.T``; floor: one read of J;
- combine: ``fusedjd.ops.combine`` against ``w @ J``; floor: one read of J and one write of n;
- GradVac aggregator: ``fusedjd.GradVac`` against torchjd's ``GradVac`` where that costs at
  most ``--torchjd-max-s`` a call (its pairwise loop runs on the host: the row says when it was
  left out); floor: two reads of J;
- MoCo step: ``fusedjd.MoCo`` against a plain PyTorch MoCo (``Y.lerp_(J, b)``, ``M = Y Yᵀ``,
  ``λ = softmax(λ - c M λ)``, ``λᵀ Y``); floor: five passes over J's size.

Then, with the time left, the tables of the CPU benchmark that make sense on a GPU (the
weightings' loops, the training step with ``jac_to_grad``, the drop-in training step).

Floors, measured at the start of the run and again at its end: a device-to-device copy
(``dst.copy_(src)``, bytes read + written) and a read-only kernel (``torch.sum`` and
``torch.amax`` over 1 GiB, the faster of the two); the floor's bandwidth is the best of these.
The multiply-add rate is cuBLAS' float32 product of two 8192 x 8192 matrices (TF32 off). A row's
floor is max(bytes / bandwidth, multiply-adds / rate), and the table says which binds; time /
floor under 1 means a floor measured wrong (or, for a row bound by multiply-adds, a kernel that
multiplies on the tensor cores).

Timing: CUDA events around each call, median, one warm-up call first; the L2 cache is flushed
(a 256 MiB write) before every timed call, so that rows whose J fits in L2 are still read from
memory; each function gets a small time budget (at least 3 repetitions). Checks: every row
compares fusedjd's result with its baseline on the device (this n); each (m, dtype) is also
checked once against ``fusedjd.reference`` in float64 on a small n (float64 copies of n = 1e8
never go to the host). Rows that do not fit in the GPU's free memory are skipped, saying so.
Each table is printed and appended to the output file as soon as its section ends, so a run cut
short leaves the finished tables; the sections share ``--budget-s`` seconds and rows past a
section's share are skipped, saying so.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torchjd import aggregation as ta

import fusedjd
from common import Table, fmt_time, fmt_x, peak_bytes, save_figure  # bench/ is sys.path[0]
from fusedjd import ops, reference
from fusedjd.reference import rel_err

F32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class Grid:
    ns: tuple[int, ...]
    ms: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    n_check: int  # n of the float64 reference checks
    fn_budget_s: float  # timing budget of one function in one row
    buffer_elems: int  # float32 elements of the floors' buffers
    gemm: int  # side of the square product that measures the multiply-add rate


GPU_GRID = Grid(ns=(10**7, 10**8), ms=(2, 8, 16, 32, 64), dtypes=(F32, BF16), n_check=10**5, fn_budget_s=0.1,
                buffer_elems=2**28, gemm=8192)
TINY_GRID = Grid(ns=(10**4,), ms=(2, 8), dtypes=(F32, BF16), n_check=10**3, fn_budget_s=0.01,
                 buffer_elems=2**24, gemm=512)


def nice(n: int) -> str:
    e = int(round(math.log10(n))) if n > 0 else 0
    return f"1e{e}" if 10**e == n else f"{n:,}"


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Clock:
    """Median time of a function: CUDA events on a GPU (the L2 flushed before each call), the host
    clock on the CPU."""

    def __init__(self, device: str, flush_bytes: int = 256 * 2**20):
        self.device = device
        self.cuda = device == "cuda"
        self.flush = torch.empty(flush_bytes // 4, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn: Callable[[], object]) -> float:
        """One call, timed (no warm-up)."""
        self.sync()
        if self.cuda:
            self.flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def median(self, fn: Callable[[], object], budget_s: float, min_reps: int = 3, max_reps: int = 100,
               warmup: bool = True) -> tuple[float, int]:
        """(median seconds, repetitions): one untimed warm-up call, then calls until the budget is
        spent (at least min_reps)."""
        if warmup:
            fn()
            self.sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
            times.append(self.once(fn))
        return statistics.median(times), len(times)


@dataclass
class Floors:
    copy_bw: float  # bytes read + written per second
    sum_bw: float  # bytes read per second
    amax_bw: float
    fma_rate: float  # float32 multiply-adds per second

    @property
    def read_bw(self) -> float:
        return max(self.sum_bw, self.amax_bw)

    @property
    def bw(self) -> float:
        return max(self.copy_bw, self.read_bw)

    def describe(self) -> str:
        return (f"copy {self.copy_bw / 1e9:,.0f} GB/s (read + write), read {self.read_bw / 1e9:,.0f} GB/s "
                f"(sum {self.sum_bw / 1e9:,.0f}, amax {self.amax_bw / 1e9:,.0f}); floor bandwidth "
                f"{self.bw / 1e9:,.0f} GB/s; float32 multiply-adds {self.fma_rate / 1e9:,.0f} G/s")


def measure_floors(clock: Clock, grid: Grid) -> Floors:
    dev = clock.device
    src = torch.empty(grid.buffer_elems, dtype=F32, device=dev).uniform_()
    dst = torch.empty_like(src)
    nb = src.numel() * 4
    t_copy, _ = clock.median(lambda: dst.copy_(src), 0.1)
    del dst
    t_sum, _ = clock.median(lambda: torch.sum(src), 0.1)
    t_amax, _ = clock.median(lambda: torch.amax(src), 0.1)
    del src
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(grid.gemm, grid.gemm, device=dev)
        t_mm, _ = clock.median(lambda: a @ a, 0.1)
        del a
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    if clock.cuda:
        torch.cuda.empty_cache()
    return Floors(2 * nb / t_copy, nb / t_sum, nb / t_amax, grid.gemm**3 / t_mm)


def dev_rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ computed where the tensors lie (float64): inf if got is not
    finite."""
    a, b = got.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    d = float((a - b).norm())
    r = float(b.norm())
    return d / r if r > 0 else d


class PlainMoCo:
    """MoCo as plain PyTorch would write it on a GPU (Y updated in place): the baseline."""

    def __init__(self, m: int, n: int, dtype: torch.dtype, device: str, beta=0.5, beta_sigma=0.5, gamma=0.1,
                 gamma_sigma=0.5):
        self.Y = torch.zeros(m, n, dtype=dtype, device=device)
        self.lam = torch.full((m,), 1.0 / m, dtype=ops.acc_dtype(dtype), device=device)
        self.k = 0
        self.hyper = (beta, beta_sigma, gamma, gamma_sigma)

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        beta, beta_sigma, gamma, gamma_sigma = self.hyper
        self.k += 1
        b, c = beta / self.k**beta_sigma, gamma / self.k**gamma_sigma
        self.Y.lerp_(J, b)
        M = (self.Y @ self.Y.T).to(self.lam.dtype)
        self.lam = torch.softmax(self.lam - c * (M @ self.lam), 0)
        return self.lam.to(self.Y.dtype) @ self.Y


@dataclass
class Section:
    name: str
    title: str
    columns: list[str]
    row: Callable  # (bench, m, n, dtype) -> list of cells after m, n, dtype
    mem_factor: float  # bytes needed / bytes of J
    check: Callable  # (bench, m, dtype) -> cell: the float64 reference check on a small n


@dataclass
class Bench:
    device: str
    grid: Grid
    clock: Clock
    floors: Floors
    out: str
    budget_s: float
    torchjd_max_s: float
    t0: float = field(default_factory=time.perf_counter)
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ratios: dict = field(default_factory=dict)  # section -> [(m, n, dtype, time / floor)]
    torchjd_pair_s: float = 1.2e-4  # torchjd GradVac's host loop, seconds per pair (learned as rows run)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def emit(self, text: str) -> None:
        """Printed and appended to the output file at once (a run cut short keeps what it wrote)."""
        print(text, flush=True)
        with open(self.out, "a") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def randn(self, m: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.randn(m, n, dtype=dtype, device=self.device)

    def free(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def free_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        self.free()
        return torch.cuda.mem_get_info()[0]

    def floor(self, nbytes: float, fmas: float) -> tuple[float, str]:
        t_mem, t_fma = nbytes / self.floors.bw, fmas / self.floors.fma_rate
        return (t_mem, "memory") if t_mem >= t_fma else (t_fma, "multiply-adds")

    def verdict(self, label: str, err: float, tol: float) -> str:
        if err < tol:
            return f"ok ({err:.0e})"
        self.mismatches.append(f"{label}: relative error {err:.2e} > {tol:.0e}")
        return f"MISMATCH ({err:.1e})"

    def timing_cells(self, section: str, m: int, n: int, dtype: torch.dtype, fn, nbytes: float,
                     fmas: float) -> tuple[float, list[str]]:
        t, _ = self.clock.median(fn, self.grid.fn_budget_s)
        fl, bound = self.floor(nbytes, fmas)
        self.ratios.setdefault(section, []).append((m, n, dtype, t / fl))
        return t, [fmt_time(t), f"{nbytes / t / 1e9:,.0f}", f"{fmt_time(fl)} ({bound})", f"{t / fl:.2f}"]


# ---- the four sections ------------------------------------------------------------------------

def gramian_row(b: Bench, m: int, n: int, dtype: torch.dtype) -> list[str]:
    J = b.randn(m, n, dtype, seed=m + n)
    fused = lambda: ops.gramian(J, [n])  # noqa: E731
    base = lambda: J @ J.T  # noqa: E731
    check = b.verdict(f"gramian m={m} n={nice(n)} {dname(dtype)} vs J @ J.T", dev_rel_err(fused()[0], base()),
                      1e-3 if dtype == F32 else 2e-2)
    es = J.element_size()
    t, cells = b.timing_cells("Gramian", m, n, dtype, fused, es * m * n, m * (m + 1) / 2 * n)
    tb, _ = b.clock.median(base, b.grid.fn_budget_s)
    return [check] + cells + [fmt_time(tb), fmt_x(tb / t)]


def gramian_check(b: Bench, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m)
    err = rel_err(ops.gramian(J, [n]), reference.gramian(J, [n]))
    return b.verdict(f"gramian m={m} n={n} {dname(dtype)} vs float64 reference", err,
                     10 * reference.TOLERANCE["gramian"][dtype])


def combine_row(b: Bench, m: int, n: int, dtype: torch.dtype) -> list[str]:
    J = b.randn(m, n, dtype, seed=m + n + 1)
    w = torch.randn(1, m, device=b.device)
    wj = w[0].to(dtype)
    fused = lambda: ops.combine(J, w, [n])  # noqa: E731
    base = lambda: wj @ J  # noqa: E731
    check = b.verdict(f"combine m={m} n={nice(n)} {dname(dtype)} vs w @ J", dev_rel_err(fused(), base()),
                      1e-4 if dtype == F32 else 2e-2)
    es = J.element_size()
    t, cells = b.timing_cells("combine", m, n, dtype, fused, es * (m + 1) * n, m * n)
    tb, _ = b.clock.median(base, b.grid.fn_budget_s)
    return [check] + cells + [fmt_time(tb), fmt_x(tb / t)]


def combine_check(b: Bench, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m + 1)
    w = torch.randn(2, m, device=b.device)
    sizes = [n // 3, n - n // 3]
    err = rel_err(ops.combine(J, w, sizes), reference.combine(J, w, sizes))
    return b.verdict(f"combine m={m} n={n} {dname(dtype)} vs float64 reference", err,
                     10 * reference.TOLERANCE["combine"][dtype])


def gradvac_row(b: Bench, m: int, n: int, dtype: torch.dtype) -> list[str]:
    J = b.randn(m, n, dtype, seed=m + n + 2)
    es = J.element_size()
    torch.manual_seed(0)
    ours = fusedjd.GradVac()
    first = ours(J).clone()  # (a later call may reuse its memory)
    t, cells = b.timing_cells("GradVac", m, n, dtype, lambda: ours(J), 2 * es * m * n,
                              (m * (m + 1) / 2 + m) * n)
    fl, _ = b.floor(2 * es * m * n, 0)
    estimate = b.torchjd_pair_s * m * (m - 1) + 10 * fl
    if estimate > b.torchjd_max_s:
        return ["not compared (torchjd not run)"] + cells + [
            f"not run: ~{fmt_time(estimate)} a call (estimated), over --torchjd-max-s", "—"]
    got: list = []
    Jc = J if dtype == F32 else J.float()  # torchjd computes in J's dtype: check it in float32
    torch.manual_seed(0)
    try:  # torchjd's first call, under the seed of fusedjd's first call: the check, and the estimate
        t1 = b.clock.once(lambda: got.append(ta.GradVac()(Jc)))
        check = b.verdict(f"GradVac m={m} n={nice(n)} {dname(dtype)} vs torchjd on float32 (first call, same seed)",
                          dev_rel_err(first, got.pop()), 1e-3 if dtype == F32 else 2e-2)
        del Jc
        theirs = ta.GradVac()
        calls = max(1, min(5, int(1.5 * b.torchjd_max_s / max(t1, 1e-6))))
        tt, reps = b.clock.median(lambda: theirs(J), b.grid.fn_budget_s, min_reps=min(3, calls), max_reps=calls,
                                  warmup=dtype != F32)
    except Exception as e:  # torchjd may refuse a dtype
        return ["—"] + cells + [f"torchjd failed: {type(e).__name__}: {str(e)[:60]}", "—"]
    if m >= 8:  # (at m = 2 torchjd's fixed cost per call dominates: it says little about the pairs)
        b.torchjd_pair_s = max(1e-6, (tt - 10 * fl) / (m * (m - 1)))
    note = "" if reps >= 3 else f" ({reps} call{'s' if reps > 1 else ''})"
    return [check] + cells + [fmt_time(tt) + note, fmt_x(tt / t)]


def gradvac_check(b: Bench, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m + 2)
    torch.manual_seed(11)
    perms = ops.draw_perms(1, m, pcgrad=False)
    torch.manual_seed(11)
    got = fusedjd.GradVac()(J)
    W = reference.gradvac_loop(reference.gramian(J, [n]), perms, torch.zeros(1, m, m, dtype=torch.float64), 0.5, 1e-8)
    expected = reference.combine(J, W, [n])
    return b.verdict(f"GradVac m={m} n={n} {dname(dtype)} vs float64 reference", rel_err(got, expected),
                     1e-3 if dtype == F32 else 2e-2)


def moco_row(b: Bench, m: int, n: int, dtype: torch.dtype) -> list[str]:
    # gradient-sized rows (|g_i| ~ 1): the softmax stays well conditioned
    J = b.randn(m, n, dtype, seed=m + n + 3).mul_(1 / math.sqrt(n))
    es = J.element_size()
    ours = fusedjd.MoCo()
    first = ours(J).clone()  # (a later call may reuse its memory)
    mem = "—"
    if b.device == "cuda":
        mem = f"{peak_bytes(lambda: ours(J), b.device) / (es * m * n):.2f}"
    t, cells = b.timing_cells("MoCo", m, n, dtype, lambda: ours(J), 5 * es * m * n, (m * (m + 1) / 2 + m) * n)
    del ours
    b.free()
    plain = PlainMoCo(m, n, dtype, b.device)
    check = b.verdict(f"MoCo m={m} n={nice(n)} {dname(dtype)} vs plain PyTorch MoCo (first step)",
                      dev_rel_err(first, plain(J)), 1e-3 if dtype == F32 else 6e-2)
    del first
    if b.device == "cuda":
        mem += f" / {peak_bytes(lambda: plain(J), b.device) / (es * m * n):.2f}"
    tp, _ = b.clock.median(lambda: plain(J), b.grid.fn_budget_s)
    return [check] + cells + [fmt_time(tp), fmt_x(tp / t), mem]


def moco_check(b: Bench, m: int, dtype: torch.dtype) -> str:
    n = b.grid.n_check
    J = b.randn(m, n, dtype, seed=7 * m + 3).mul_(1 / math.sqrt(n))
    ours, ref = fusedjd.MoCo(), reference.MoCo()
    worst = 0.0
    for _ in range(3):
        worst = max(worst, rel_err(ours(J), ref(J)[1]))
    return b.verdict(f"MoCo m={m} n={n} {dname(dtype)} vs float64 reference (3 steps)", worst,
                     1e-4 if dtype == F32 else reference.TOLERANCE["moco"][dtype])


TIMING = ["fusedjd", "GB/s", "floor (bound)", "time / floor"]
SECTIONS = [
    Section("Gramian", "Gramian: fusedjd.ops.gramian vs torch `J @ J.T` (floor: one read of J)",
            ["check (small n, float64)", "check vs J @ J.T (this n)"] + TIMING + ["torch J @ J.T", "speedup"],
            gramian_row, 1.05, gramian_check),
    Section("combine", "Combine: fusedjd.ops.combine vs torch `w @ J` (floor: one read of J, one write of n)",
            ["check (small n, float64)", "check vs w @ J (this n)"] + TIMING + ["torch w @ J", "speedup"],
            combine_row, 1.1, combine_check),
    Section("GradVac", "GradVac aggregator: fusedjd.GradVac vs torchjd 0.18 GradVac (floor: two reads of J)",
            ["check (small n, float64)", "check vs torchjd in float32 (this n)"] + TIMING + ["torchjd", "speedup"],
            gradvac_row, 3.2, gradvac_check),
    Section("MoCo", "MoCo step: fusedjd.MoCo vs plain PyTorch MoCo (`Y.lerp_(J, b)`, `Y @ Y.T`, softmax, `λ @ Y`; "
            "floor: five passes over J's size)",
            ["check (small n, float64)", "check vs plain (this n, first step)"] + TIMING
            + ["plain PyTorch", "speedup", "peak extra memory fusedjd / plain (× J)"],
            moco_row, 2.2, moco_check),
]


def run_section(b: Bench, sec: Section, deadline: float) -> Table:
    t = Table(sec.title, ["m", "n", "dtype"] + sec.columns)
    checks: dict = {}
    width = len(sec.columns)
    for n in b.grid.ns:
        for dtype in b.grid.dtypes:
            for m in b.grid.ms:
                head = [str(m), nice(n), dname(dtype)]
                if time.perf_counter() > deadline:
                    t.rows.append(head + ["skipped: this section's share of --budget-s is spent"]
                                  + ["—"] * (width - 1))
                    continue
                es = torch.empty((), dtype=dtype).element_size()
                need = sec.mem_factor * es * m * n
                free = b.free_bytes()
                if free is not None and need > 0.92 * free:
                    t.rows.append(head + [f"skipped: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"]
                                  + ["—"] * (width - 1))
                    continue
                try:
                    if (m, dtype) not in checks:
                        checks[m, dtype] = sec.check(b, m, dtype)
                    cells = sec.row(b, m, n, dtype)
                    t.rows.append(head + [checks[m, dtype]] + cells)
                    b.log(f"{sec.name} m={m} n={nice(n)} {dname(dtype)}: {' | '.join(cells[1:5])}")
                except Exception as e:  # one row's failure (say, out of memory) is reported, not fatal
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                    b.errors.append(f"{sec.name} m={m} n={nice(n)} {dname(dtype)}: {msg}")
                    traceback.print_exc()
                    t.rows.append(head + [f"error: {msg}"] + ["—"] * (width - 1))
                b.free()
    return t


def plot(b: Bench, path: str, device_name: str) -> str | None:
    """time / floor against m, one panel per section, one line per (n, dtype)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return None
    names = [s.name for s in SECTIONS if b.ratios.get(s.name)]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for n in b.grid.ns:
            for dtype in b.grid.dtypes:
                line = sorted((m, r) for m, nn, dd, r in b.ratios[name] if nn == n and dd == dtype)
                if line:
                    ax.plot([p[0] for p in line], [p[1] for p in line], "o-", label=f"n={nice(n)} {dname(dtype)}")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set(xscale="log", xlabel="m", ylabel="time / floor", title=name)
        ax.set_xticks(list(b.grid.ms), [str(m) for m in b.grid.ms])
        ax.xaxis.set_minor_locator(NullLocator())
        ratios = [r for *_, r in b.ratios[name]]
        if max(ratios) > 10 * min(ratios):
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, f"fusedjd: time / floor, {device_name}", dpi=100)


def main(args, device: str, extras: list[tuple[str, Callable[[], Table]]], extra_mismatches: list[str],
         out: str) -> int:
    """Runs the grid on `device` (cuda, or the CPU with --tiny), then the extras while time is
    left (their checks report to extra_mismatches); returns the exit status (1 on a mismatch or
    an error)."""
    grid = TINY_GRID if args.tiny else GPU_GRID
    budget = args.budget_s if args.budget_s is not None else (60.0 if args.tiny else 240.0)
    if device == "cuda":
        device_name = torch.cuda.get_device_name()
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        l2 = getattr(p, "L2_cache_size", 0)
        hw = (f"{p.multi_processor_count} SMs, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), "
              f"L2 {l2 / 2**20:.0f} MiB")
    else:
        device_name = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        hw = f"{os.cpu_count()} cores"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    open(out, "w").close()
    clock = Clock(device)
    t_start = time.perf_counter()
    floors = measure_floors(clock, grid)
    b = Bench(device, grid, clock, floors, out, budget, args.torchjd_max_s, t0=t_start)
    b.emit("\n".join([
        f"# fusedjd GPU benchmark{' (tiny dry-run grid)' if args.tiny else ''} — {device_name}",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; {hw}",
        f"- torch {torch.__version__}, torchjd {importlib.metadata.version('torchjd')}, fusedjd {fusedjd.__version__} "
        f"({fusedjd.build_info()}), Python {platform.python_version()}",
        f"- command: `python bench/run.py {' '.join(sys.argv[1:])}`",
        f"- floors at the start: {floors.describe()}",
        "- time / floor: median time over max(bytes / floor bandwidth, multiply-adds / rate); L2 flushed "
        "before every timed call" + (" (GPU)" if device == "cuda" else " (not on the CPU)"),
        f"- time budget: {budget:.0f} s over the four sections (each its share of what is left), then extras",
        "",
    ]))
    b.log(f"floors: {floors.describe()}")
    for i, sec in enumerate(SECTIONS):
        left = budget - b.elapsed()
        deadline = time.perf_counter() + max(left, 0) / (len(SECTIONS) - i)
        b.log(f"section {sec.name}: {max(left, 0) / (len(SECTIONS) - i):.0f} s")
        b.emit(run_section(b, sec, deadline).markdown())
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
        b.free()
    b.mismatches += extra_mismatches
    end = measure_floors(clock, grid)
    tail = [f"- floors at the end: {end.describe()}", f"- total time: {b.elapsed():.0f} s"]
    png = plot(b, os.path.splitext(out)[0] + ".png", device_name)
    if png:
        tail.append(f"\n![time / floor]({os.path.basename(png)})")
    if b.mismatches:
        tail.append("\nMISMATCHES:\n" + "\n".join(f"- {x}" for x in b.mismatches))
    if b.errors:
        tail.append("\nERRORS:\n" + "\n".join(f"- {x}" for x in b.errors))
    b.emit("\n".join(tail))
    print(f"results written to {out}" + (f" and {png}" if png else " (no plot: matplotlib not installed)"))
    return 1 if b.mismatches or b.errors else 0
