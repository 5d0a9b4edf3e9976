"""Timing, formatting and progress helpers for the fusedjd benchmarks."""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, budget_s: float = 0.4, min_reps: int = 3,
                max_reps: int = 2000, warmup: bool = True, flush: torch.Tensor | None = None) -> float:
    """Median wall time of fn() in seconds: warm-up first, then repetitions until the time budget
    (at least min_reps, at most max_reps). CUDA: timed with events around each call. ``flush``: a
    buffer zeroed before each timed call (untimed), larger than the cache, so that every call reads
    its tensors from memory. (Calls of a few microseconds take many repetitions: right after a
    parallel call, such as the floor's read, torch's idle OpenMP threads spin for a few
    milliseconds on cores the call shares.)"""
    if warmup:
        fn()
        sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if flush is not None:
            flush.zero_()
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes of tensors allocated while fn() runs, above what was allocated before: the CUDA
    allocator's peak on a GPU; on the CPU the running total of the profiler's allocations and frees
    in time order, each allocation at the start of the op that made it (untimed: the profiler
    slows the call)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # the profiler logs two lines to stderr per use: keep the progress line readable
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    # each allocation counted once (in the op that made it: self usage), frees as they come
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    total = peak = 0
    for e in events:
        total += e.self_cpu_memory_usage
        peak = max(peak, total)
    return peak


def rel_err_here(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖got − expected‖ / ‖expected‖`` in float64 on ``got``'s device (no host copy of a large
    tensor); inf when ``got`` is not finite."""
    a = got.detach().double()
    b = expected.detach().to(a.device, torch.float64)
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    d, r = float((a - b).norm()), float(b.norm())
    return d / r if r > 0 else d


@dataclass
class Floors:
    """A device's floors, in the CUDA grid: a device copy (bytes read + written per second), a
    read-only kernel (torch.sum and torch.amax: bytes read per second), and float32 multiply-adds
    per second (a square product, TF32 off)."""

    copy_bw: float
    sum_bw: float
    amax_bw: float
    fma_rate: float

    @property
    def bw(self) -> float:
        return max(self.copy_bw, self.sum_bw, self.amax_bw)

    def describe(self) -> str:
        return (f"copy {self.copy_bw / 1e9:,.0f} GB/s (read + write), read {max(self.sum_bw, self.amax_bw) / 1e9:,.0f} "
                f"GB/s (sum {self.sum_bw / 1e9:,.0f}, amax {self.amax_bw / 1e9:,.0f}); floor bandwidth "
                f"{self.bw / 1e9:,.0f} GB/s; float32 multiply-adds {self.fma_rate / 1e9:,.0f} G/s")


def measure_floors(device: str, elems: int, gemm: int, flush: torch.Tensor | None) -> Floors:
    """The floors on ``device``: buffers of ``elems`` float32, a ``gemm`` x ``gemm`` product."""
    timed = lambda fn: median_time(fn, device, budget_s=0.1, max_reps=100, flush=flush)  # noqa: E731
    src = torch.empty(elems, device=device).uniform_()
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    t_copy = timed(lambda: dst.copy_(src))
    del dst
    t_sum, t_amax = timed(lambda: torch.sum(src)), timed(lambda: torch.amax(src))
    del src
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(gemm, gemm, device=device)
        t_mm = timed(lambda: a @ a)
        del a
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    if device == "cuda":
        torch.cuda.empty_cache()
    return Floors(2 * nbytes / t_copy, nbytes / t_sum, nbytes / t_amax, gemm**3 / t_mm)


def fmt_mib(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:.1f} MiB"


def fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    if t < 1e-3:
        return f"{t * 1e6:.1f} µs"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def fmt_x(x: float | None) -> str:
    return "—" if x is None else (f"{x:,.0f}×" if x >= 100 else f"{x:.1f}×")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join(" --- " for _ in self.columns) + "|"]
        out += ["| " + " | ".join(map(str, r)) + " |" for r in self.rows]
        return "\n".join(out) + "\n"


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = max(total, 1), 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        el = time.perf_counter() - self.t0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {el:5.0f}s  {label[:60]:<60}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def save_figure(fig, path: str, title: str, dpi: int) -> str:
    """Titles, lays out, writes and closes a benchmark figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
