"""fusedjd benchmark: fusedjd against torchjd 0.18 and plain PyTorch, on the device at hand.

    python bench/run.py               # default set, a few minutes on a 2-core CPU
    python bench/run.py --full        # the full grid
    python bench/run.py --device cuda # the GPU grid (bench/gpu_grid.py), about 4 minutes on an H200
    python bench/run.py --tiny        # the GPU grid's code on a tiny grid, on the CPU (a dry run)

Every row checks fusedjd's result against the baseline (or fusedjd.reference) before it times
anything; a row whose check fails is marked MISMATCH and the run exits non-zero. Times are
medians (CUDA events on a GPU). time / floor divides by the time of moving the same bytes at
the floor's bandwidth (a GPU's device-to-device copy, a CPU's streaming read), measured right
before and right after that row is timed: on a shared machine the bandwidth moves within a run.
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
from common import (Progress, Table, fmt_mib, fmt_time, fmt_x, median_time, peak_bytes,  # bench/ is sys.path[0]
                    save_figure, stream_bandwidth, sync)
from fusedjd import reference
from fusedjd.reference import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))


class PlainMoCo(ta.Aggregator):
    """MoCo written the plain PyTorch way (fusedjd.reference.MoCo in J's dtype and device: a
    temporary for every expression), as a torchjd aggregator so that jac_to_grad takes it."""

    def __init__(self):
        super().__init__()
        self.moco = reference.MoCo(dtype=None)

    def forward(self, J):
        return self.moco(J)[1]


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
    kind: str  # "GradVac", "PCGrad" or "GroupedGradVac"
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

    def timed(self, fn, nbytes: int) -> tuple[float, str]:
        """fn's median time and its time / floor: the time of moving nbytes at the floor's
        bandwidth, measured right before and right after fn is timed (the better of the two). On a
        shared machine the bandwidth other processes leave moves within a run; a floor measured
        once would flatter some rows and wrong others."""
        before = stream_bandwidth(self.device)
        t = median_time(fn, self.device)
        bandwidth = max(before, stream_bandwidth(self.device))
        self.bandwidths.append(bandwidth)
        return t, f"{t / (nbytes / bandwidth):.2f}"


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
        tf, ratio = run.timed(fused, nbytes)
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
              ["aggregator", "m", "n", "check", "fusedjd", "GB/s", "time / floor", "torch J@Jᵀ + wᵀJ", "torchjd",
               "speedup"])
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
            ours_cls, theirs_cls = {"GradVac": (fusedjd.GradVac, ta.GradVac), "PCGrad": (fusedjd.PCGrad, ta.PCGrad)}[kind]
            ours, theirs = ours_cls(), theirs_cls()
            theirs_call = lambda: theirs(J)  # noqa: E731
            status = run.check(f"{kind} m={m} n={n}", seeded(lambda: ours_cls()(J))(), seeded(lambda: theirs_cls()(J))(), 1e-3)
            label = kind
            plain = median_time(lambda: (J @ J.T, w @ J), device)
        nbytes = 2 * 4 * m * n  # two reads of J (GPU: the Gramian's read and the combine's read + write)
        tf, ratio = run.timed(lambda: ours(J), nbytes)
        tt = median_time(theirs_call, device, budget_s=1.0, min_reps=2)
        if kind == "GradVac":
            run.speedups["n"].append((m, n, tt / tf))
        t.rows.append([label, str(m), nice_n(n), status, fmt_time(tf), f"{nbytes / tf / 1e9:.0f}",
                       ratio, fmt_time(plain), fmt_time(tt), fmt_x(tt / tf)])
        run.progress.step(f"{label} m={m} n={n}")
        del J
    return t


def bench_moco(run: Run, cfg: list[MocoCase]):
    device = run.device
    t = Table("MoCo step (fp32): fusedjd vs plain PyTorch MoCo",
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
        tf, ratio = run.timed(lambda: ours(J), nbytes)
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
    ns = [10**5, 10**6, 4 * 10**6] + ([10**7] if full else [])
    groups64 = ("64 groups", [4 * 10**6 // 64] * 64)
    gram = [GramCase(m, n) for m in (2, 8, 32) for n in ns] + [GramCase(8, 0, grouping)]
    gram += [GramCase(8, 0, groups64)] + [GramCase(8, 4 * 10**6, g, dt) for dt in (torch.bfloat16, torch.float16)
                                         for g in (None, groups64)]
    gram += [GramCase(32, 10**6, None, dt) for dt in (torch.bfloat16, torch.float16)]
    agg = [AggCase("GradVac", m, n) for m in (2, 8, 32) for n in ns]
    agg += [AggCase("PCGrad", 8, 10**6), AggCase("GroupedGradVac", 8, 0, grouping)]
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
    gram, loops, agg, moco, train = configs(device, args.full)
    run = Run(device, Progress(len(gram) + 2 * len(loops) + 2 * len(PROJECTOR_MS) + len(agg) + len(moco) + TRAIN_ROWS))
    tables = [
        bench_jac_to_grad(run, train),
        bench_gramian(run, gram),
        bench_loops(run, loops),
        bench_projector(run, PROJECTOR_MS),
        bench_aggregators(run, agg),
        bench_moco(run, moco),
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
        ("- floor: device-to-device copy bandwidth (read + write)" if device == "cuda" else
         "- floor: streaming read bandwidth (a sum over 256 MiB)")
        + ", measured right before and right after each row with a time / floor is timed (the better "
        "of the two for that row): time / floor = time / (bytes streamed / that bandwidth); it ranged "
        f"{min(run.bandwidths) / 1e9:.0f}–{max(run.bandwidths) / 1e9:.0f} GB/s over this run",
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
