"""GPU checks of fusedjd that the test suite cannot make without a GPU, each printed as a PASS or
FAIL line (an exception fails its case only), then "graph check: N passed, M failed".

    python3 scripts/gpu/checks.py            # the checks (about half a minute on an H200)
    python3 scripts/gpu/checks.py --timing   # eager call against graph replay, informational
    python3 scripts/gpu/checks.py --list     # the cases, without running them (no GPU needed)

1. CUDA-graph capture and replay against eager calls: every op pipeline (Gramian, loops, combine,
   MoCo step, aggregate with orders drawn on the device) and every class (MoCo, MoCoWeighting,
   and GradVac, PCGrad, GroupedGradVac and the two weightings with ``draws="device"``), replayed
   on new data written into the captured inputs; the eager twin starts from the same state and,
   for device draws, from the same ``torch.cuda.manual_seed`` (a captured graph consumes the
   CUDA generator's Philox offsets on each replay as eager calls do, so the orders match).
2. Device draws are valid and fresh: m = 4, the same J replayed 3 times; each replay must equal
   the result of one of the (3!)^4 = 1296 combinations of visit orders (brute force), and no
   single combination may explain all replays (orders frozen at capture would).
3. The default draws (torchjd's, on the host) refuse a capture: RuntimeError naming draws="device".
   ``ops.aggregate`` without orders must refuse it too, or draw fresh orders on each replay.
4. No host synchronisation in a GradVac, a MoCo and an UPGrad step, called directly and through
   ``fusedjd.jac_to_grad``: under ``torch.cuda.set_sync_debug_mode("error")``, and with a 300 ms
   kernel queued first (a call that waited for the device would take that long).
5. Device activity per step (``torch.profiler``, steady state, m = 8, n = 1e6): kernels, memcpy
   (host-to-device among them) and memset events of GradVac, PCGrad and MoCo; FAIL above the
   targets (GradVac, PCGrad: 5 kernels; MoCo: 4; at most 1 host-to-device copy).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
import traceback
from typing import Callable

import torch

DEV = "cuda"
results: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def info(msg: str) -> None:
    print(f"INFO  {msg}", flush=True)


def first_line(e: BaseException) -> str:
    s = str(e)
    return f"{type(e).__name__}: {s.splitlines()[0][:200] if s else ''}"


def run_case(name: str, body: Callable[[], tuple[bool, str]]) -> None:
    try:
        ok, detail = body()
    except Exception as e:  # a refused capture, an illegal call, a missing feature
        ok, detail = False, first_line(e)
        traceback.print_exc()
    try:
        torch.cuda.synchronize()
    except Exception as e:  # a sticky CUDA error: the cases after this one will say so too
        ok, detail = False, f"{detail}; the device is broken after the case: {first_line(e)}"
    report(name, ok, detail)


class Captured:
    """fn() captured in a CUDA graph after `warmup` calls on a side stream (the capture runs no
    kernel: the state it leaves is the warm-up's)."""

    def __init__(self, fn: Callable, warmup: int = 2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self):
        self.graph.replay()
        torch.cuda.synchronize()
        return self.out


def flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for y in x for t in flat(y)]


def state(mod: torch.nn.Module) -> list[torch.Tensor]:
    return [v for v in mod.state_dict().values() if isinstance(v, torch.Tensor)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    d, r = float((a - b).norm()), float(b.norm())
    return d / r if r > 0 else d


def compare(got: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[bool, float]:
    if len(got) != len(expected):
        raise AssertionError(f"{len(got)} tensors against {len(expected)}")
    equal = all(torch.equal(a, b) for a, b in zip(got, expected))
    return equal, max((rel(a, b) for a, b in zip(got, expected)), default=0.0)


def randn(gen: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


# ---- 1. capture and replay against eager ------------------------------------------------------

def ops_loop_pipeline(dtype, m, blocks, sizes, pcgrad=False, replays=3):
    """gramian -> gradvac_loop (targets in place) or pcgrad_loop -> combine, J as a block list,
    fixed visit orders."""
    def body():
        from fusedjd import ops
        gen = torch.Generator().manual_seed(m * 1000 + len(blocks))
        k = len(sizes)
        Js = [randn(gen, m, b, dtype=dtype).to(DEV) for b in blocks]
        perms = ops.draw_perms(k, m, pcgrad=pcgrad).to(DEV)
        targets = torch.zeros(k, m, m, dtype=ops.acc_dtype(dtype), device=DEV)

        def loop(G, T):
            return ops.pcgrad_loop(G, perms) if pcgrad else ops.gradvac_loop(G, perms, T, 0.5, 1e-8)

        def fn():
            W = loop(ops.gramian(Js, sizes), targets)
            return ops.combine(Js, W, sizes), W

        cap = Captured(fn)
        t_eager = targets.clone()
        worst, all_equal = 0.0, True
        for _ in range(replays):
            new = [randn(gen, m, b, dtype=dtype) for b in blocks]
            for J, x in zip(Js, new):
                J.copy_(x)
            got = cap.replay()
            Jn = [x.to(DEV) for x in new]
            W_e = loop(ops.gramian(Jn, sizes), t_eager)
            eq, err = compare([got[0], got[1], targets], [ops.combine(Jn, W_e, sizes), W_e, t_eager])
            all_equal &= eq
            worst = max(worst, err)
        return worst < 1e-6, f"bit-identical={all_equal} max rel err={worst:.1e} over {replays} replays"
    return body


def ops_moco_pipeline(dtype, m, n, projection, with_gram, replays=3):
    """moco_step on state tensors (updated in place), optionally with moco_gramian's Gramian."""
    def body():
        from fusedjd import ops
        gen = torch.Generator().manual_seed(m + n)
        J = randn(gen, m, n, dtype=dtype).div_(n**0.5).to(DEV)
        Y = torch.zeros(m, n, dtype=dtype, device=DEV)
        lam = torch.full((m,), 1.0 / m, dtype=ops.acc_dtype(dtype), device=DEV)
        step = torch.zeros((), dtype=torch.long, device=DEV)
        hyper = (0.5, 0.5, 0.1, 0.5, 0.1, projection)

        def fn(J=J, Y=Y, lam=lam, step=step):
            gram = ops.moco_gramian(J, Y, step, 0.5, 0.5) if with_gram else None
            return ops.moco_step(J, Y, lam, step, *hyper, gram)

        cap = Captured(fn)
        Ye, lame, stepe = Y.clone(), lam.clone(), step.clone()
        worst, all_equal = 0.0, True
        for _ in range(replays):
            x = randn(gen, m, n, dtype=dtype).div_(n**0.5)
            J.copy_(x)
            got = cap.replay()
            exp = fn(x.to(DEV), Ye, lame, stepe)
            eq, err = compare(flat(got) + [Y, lam, step], flat(exp) + [Ye, lame, stepe])
            all_equal &= eq
            worst = max(worst, err)
        return worst < 1e-5, (f"bit-identical={all_equal} max rel err={worst:.1e} (outputs and state) "
                              f"over {replays} replays")
    return body


def ops_aggregate_device_perms(m, n, sizes, pcgrad, replays=3, seed=77):
    """draw_perms_device -> aggregate(perms=...) captured, against eager under the same CUDA seed."""
    def body():
        from fusedjd import ops
        gen = torch.Generator().manual_seed(m + n + 5)
        k = len(sizes)
        J = randn(gen, m, n).to(DEV)
        T = None if pcgrad else torch.zeros(k, m, m, device=DEV)

        def fn(J=J, T=T):
            return ops.aggregate(J, sizes, T, 0.5, 1e-8, pcgrad, ops.draw_perms_device(k, m, DEV))

        cap = Captured(fn)
        Te = None if pcgrad else T.clone()
        xs = [randn(gen, m, n) for _ in range(replays)]
        torch.cuda.manual_seed(seed)
        got = []
        for x in xs:
            J.copy_(x)
            got.append([t.clone() for t in flat(cap.replay()) + ([] if pcgrad else [T])])
        torch.cuda.manual_seed(seed)
        worst, all_equal = 0.0, True
        for x, g in zip(xs, got):
            exp = flat(fn(x.to(DEV), Te)) + ([] if pcgrad else [Te])
            eq, err = compare(g, [t.clone() for t in exp])
            all_equal &= eq
            worst = max(worst, err)
        return worst < 1e-6, f"bit-identical={all_equal} max rel err={worst:.1e} over {replays} replays"
    return body


def moco_class(kind, dtype, m, n, replays=3, **kw):
    def body():
        import fusedjd
        gen = torch.Generator().manual_seed(m + n)
        cls = {"MoCo": fusedjd.MoCo, "MoCoWeighting": fusedjd.MoCoWeighting}[kind]
        agg = cls(**kw)
        J = randn(gen, m, n, dtype=dtype).div_(n**0.5).to(DEV)
        agg(J)  # the state is allocated eagerly, outside the capture
        cap = Captured(lambda: agg(J))
        twin = cls(**kw)
        twin(J)
        twin.load_state_dict(agg.state_dict())
        worst, all_equal = 0.0, True
        for _ in range(replays):
            x = randn(gen, m, n, dtype=dtype).div_(n**0.5)
            J.copy_(x)
            got = cap.replay()
            expected = twin(x.to(DEV))
            eq, err = compare([got] + state(agg), [expected] + state(twin))
            all_equal &= eq
            worst = max(worst, err)
        return worst < 1e-5, (f"bit-identical={all_equal} max rel err={worst:.1e} (output and state) "
                              f"over {replays} replays")
    return body


def make_drawing(kind: str, sizes: list[int] | None = None, **kw):
    """One of the five classes that draw visit orders; the weightings take a Gramian."""
    import fusedjd
    return {
        "GradVac": lambda: fusedjd.GradVac(**kw),
        "PCGrad": lambda: fusedjd.PCGrad(**kw),
        "GroupedGradVac": lambda: fusedjd.GroupedGradVac(sizes, **kw),
        "GradVacWeighting": lambda: fusedjd.GradVacWeighting(**kw),
        "PCGradWeighting": lambda: fusedjd.PCGradWeighting(**kw),
    }[kind]()


def drawing_input(kind: str, J: torch.Tensor) -> torch.Tensor:
    """What the class is called with: J, or its Gramian for the weightings."""
    return (J @ J.T) if kind.endswith("Weighting") else J


def device_draws_vs_eager(kind, m, n, sizes=None, replays=3, seed=1234):
    """draws="device": captured, replayed on new data, against an eager twin that starts from the
    same state and the same torch.cuda.manual_seed."""
    def body():
        gen = torch.Generator().manual_seed(7 * m + n)
        agg = make_drawing(kind, sizes, draws="device")
        X = drawing_input(kind, randn(gen, m, n).to(DEV))
        agg(X)  # the state is allocated eagerly
        cap = Captured(lambda: agg(X))
        twin = make_drawing(kind, sizes, draws="device")
        twin(X)
        twin.load_state_dict(agg.state_dict())
        xs = [drawing_input(kind, randn(gen, m, n).to(DEV)) for _ in range(replays)]
        torch.cuda.manual_seed(seed)
        got = []
        for x in xs:
            X.copy_(x)
            got.append([t.clone() for t in [cap.replay()] + state(agg)])
        torch.cuda.manual_seed(seed)
        worst, all_equal = 0.0, True
        for x, g in zip(xs, got):
            exp = [twin(x.clone())] + state(twin)
            eq, err = compare(g, [t.clone() for t in exp])
            all_equal &= eq
            worst = max(worst, err)
        return worst < 1e-6, (f"bit-identical={all_equal} max rel err={worst:.1e} over {replays} replays "
                              f"(same torch.cuda.manual_seed before the replays and before the eager calls)")
    return body


# ---- 2. device draws: valid and fresh (brute force over every order at m = 4) -----------------

def all_orders(m: int) -> torch.Tensor:
    rows = [list(itertools.permutations([j for j in range(m) if j != i])) for i in range(m)]
    return torch.tensor(list(itertools.product(*rows)), dtype=torch.long)  # [((m-1)!)^m, m, m-1]


def conflicting(gen: torch.Generator, m: int, n: int) -> torch.Tensor:
    """m rows whose pairs all conflict (cosines near -1/(m-1)), of unequal norms, with noise: every
    visit order then gives its own result."""
    B = torch.randn(m, n, generator=gen, dtype=torch.float64)
    B = B / B.norm(dim=1, keepdim=True)
    R = B - B.sum(0, keepdim=True) / m
    R = R + 0.15 * torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5
    return (R * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5, 0.7][:m], dtype=torch.float64).view(m, 1)).float()


def matching_orders(G: torch.Tensor, T: torch.Tensor | None, beta: float, eps: float, P: torch.Tensor,
                    observed: torch.Tensor, Jg: torch.Tensor | None, T_after: torch.Tensor | None,
                    tol: float = 1e-5) -> tuple[set[int], float, float]:
    """Indices of the order combinations P [K, m, m-1] whose step explains what was observed: the
    weights (Jg None) or the combination w @ Jg, and the targets after the step (GradVac). Also
    the best error, and the smallest error among the combinations that do not match."""
    from fusedjd import ops
    K, m = P.shape[0], G.shape[-1]
    Gk = G.reshape(1, m, m).expand(K, m, m).contiguous()
    if T is None:
        W = ops.pcgrad_loop(Gk, P)
    else:
        Tk = T.reshape(1, m, m).expand(K, m, m).contiguous()
        W = ops.gradvac_loop(Gk, P, Tk, beta, eps)
    cand = W.double() if Jg is None else W.double() @ Jg.double()
    obs = observed.double().reshape(1, -1)
    err = (cand - obs).norm(dim=1) / obs.norm()
    if T is not None:
        err = torch.maximum(err, (Tk.double() - T_after.double().reshape(1, m, m)).abs().amax(dim=(1, 2)))
    err = err.cpu()
    match = err < tol
    idx = set(torch.nonzero(match).flatten().tolist())
    best = float(err.min())
    other = float(err[~match].min()) if bool((~match).any()) else float("inf")
    return idx, best, other


def device_draws_valid_and_fresh(kind, replays=3, groups=1):
    def body():
        import fusedjd  # noqa: F401
        from fusedjd import ops
        m, nb = 4, 1500
        gen = torch.Generator().manual_seed(4242 + groups)
        sizes = [nb] * groups
        J = torch.cat([conflicting(gen, m, nb) for _ in range(groups)], dim=1).to(DEV)
        pcgrad = kind.startswith("PCGrad")
        # GradVac with beta = 0 keeps its targets at 0: every conflicting pair is corrected at every
        # step, so that different orders give clearly different results (the EMA is checked above)
        agg = make_drawing(kind, sizes, draws="device", **({} if pcgrad else {"beta": 0.0}))
        X = drawing_input(kind, J)
        agg(X)
        cap = Captured(lambda: agg(X))
        beta = getattr(agg, "beta", 0.0)
        eps = getattr(agg, "eps", 0.0)
        P = all_orders(m).to(DEV)
        Gs = ops.gramian(J, sizes)  # [groups, m, m]
        sets: list[list[set[int]]] = [[] for _ in range(groups)]
        worst_best, closest_other = 0.0, float("inf")
        for _ in range(replays):
            T_before = None if pcgrad else [t for t in state(agg) if t.dim() == 3][0].clone()
            out = cap.replay().clone()
            T_after = None if pcgrad else [t for t in state(agg) if t.dim() == 3][0].clone()
            col = 0
            for g in range(groups):
                if kind.endswith("Weighting"):
                    observed, Jg = out, None
                else:
                    observed, Jg = out[col:col + sizes[g]], J[:, col:col + sizes[g]]
                col += sizes[g]
                idx, best, other = matching_orders(
                    Gs[g] if not kind.endswith("Weighting") else X.to(Gs.dtype), None if pcgrad else T_before[g],
                    beta, eps, P, observed, Jg, None if pcgrad else T_after[g])
                sets[g].append(idx)
                worst_best = max(worst_best, best)
                closest_other = min(closest_other, other)
        valid = all(len(s) > 0 for per in sets for s in per)
        frozen = [g for g in range(groups) if set.intersection(*sets[g])]
        sizes_txt = "; ".join("/".join(str(len(s)) for s in per) for per in sets)
        detail = (f"{P.shape[0]} order combinations; matches per replay {sizes_txt}; best error {worst_best:.1e}, "
                  f"closest non-matching {closest_other:.1e}")
        if not valid:
            return False, "a replay matches no valid visit order: " + detail
        if frozen:
            return False, f"orders look frozen (one combination explains every replay, groups {frozen}): " + detail
        return True, "every replay is a valid draw, and they differ: " + detail
    return body


# ---- 3. refusals --------------------------------------------------------------------------------

def exception_text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def refuses_capture(kind):
    """The default draws (torchjd's, on the host) must refuse a CUDA-graph capture."""
    def body():
        gen = torch.Generator().manual_seed(99)
        agg = make_drawing(kind, [3000, 5000])
        X = drawing_input(kind, randn(gen, 8, 8000).to(DEV))
        agg(X)  # eager: fine
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                agg(X)
        except RuntimeError as e:
            text = exception_text(e)
            if 'draws="device"' in text:
                return True, f"refused: {text.splitlines()[0][:150]}"
            return False, f"RuntimeError without 'draws=\"device\"' in it: {text.splitlines()[0][:150]}"
        return False, "captured without an error: its replays would reuse the orders drawn at capture"
    return body


def aggregate_host_draws_capture():
    """ops.aggregate without orders draws them on the host: a capture must be refused, or (if it
    draws on the device under capture) the replays of one J must differ."""
    def body():
        from fusedjd import ops
        gen = torch.Generator().manual_seed(5)
        J = conflicting(gen, 4, 3000).to(DEV)
        ops.aggregate(J, [3000], None, 0.0, 0.0, True)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                out = ops.aggregate(J, [3000], None, 0.0, 0.0, True)[0]
        except RuntimeError as e:
            return True, f"refused: {exception_text(e).splitlines()[0][:150]}"
        outs = []
        for _ in range(4):
            g.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
        differ = any(not torch.equal(outs[0], o) for o in outs[1:])
        return differ, ("captured; replays draw new orders" if differ else
                        "captured, and 4 replays of one J give one result: the orders are frozen")
    return body


# ---- 4. no host synchronisation ----------------------------------------------------------------

def sleep_cycles_for(ms: float) -> int:
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10**7)
    b.record()
    b.synchronize()
    return int(10**7 * ms / max(a.elapsed_time(b), 1e-3))


def no_host_sync(kind: str, via: str):
    def body():
        import fusedjd
        m, n = 8, 10**6
        gen = torch.Generator().manual_seed(3)
        agg = {"GradVac": fusedjd.GradVac, "MoCo": fusedjd.MoCo, "UPGrad": fusedjd.UPGrad}[kind]()
        if via == "direct":
            J = randn(gen, m, n).to(DEV)
            call = lambda: agg(J)  # noqa: E731
        else:
            shapes = [(1000, 500), (500,), (499, 1000)]
            params = [torch.zeros(s, device=DEV, requires_grad=True) for s in shapes]
            for p in params:
                p.jac = randn(gen, m, *p.shape).to(DEV)
            call = lambda: fusedjd.jac_to_grad(params, agg, retain_jac=True)  # noqa: E731
        call()  # warm-up: state, workspaces, pinned buffers
        call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        cycles = sleep_cycles_for(300.0)
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        call()
        host = time.perf_counter() - t0
        busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        ok = busy and host < 0.1
        return ok, (f"sync debug mode 'error': no sync; with a 300 ms kernel queued first the call returned "
                    f"in {host * 1e3:.2f} ms, the stream {'still busy' if busy else 'IDLE (the call waited)'}")
    return body


# ---- 5. device activity per step ---------------------------------------------------------------

def activity_per_step(kind: str, limit: int | None, steps: int = 5, **kw):
    def body():
        import fusedjd
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        m, n = 8, 10**6
        gen = torch.Generator().manual_seed(8)
        J = randn(gen, m, n).to(DEV)
        agg = {"GradVac": fusedjd.GradVac, "PCGrad": fusedjd.PCGrad, "MoCo": fusedjd.MoCo}[kind](**kw)
        for _ in range(3):
            agg(J)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                agg(J)
            torch.cuda.synchronize()
        kernels, memcpy, h2d, memset, names = 0, 0, 0, 0, {}
        for e in prof.events():
            if e.device_type != DeviceType.CUDA:
                continue
            if e.name.startswith("Memcpy"):
                memcpy += 1
                h2d += "HtoD" in e.name
            elif e.name.startswith("Memset"):
                memset += 1
            else:
                kernels += 1
                names[e.name[:60]] = names.get(e.name[:60], 0) + 1
        per = lambda x: x / steps  # noqa: E731
        detail = (f"per step: {per(kernels):g} kernels, {per(memcpy):g} memcpy ({per(h2d):g} host-to-device), "
                  f"{per(memset):g} memset; kernels: " + ", ".join(f"{k} x{v / steps:g}" for k, v in names.items()))
        if kernels == 0:
            return False, "the profiler saw no kernel at all (no CUDA activity recorded?)"
        if limit is None:
            info(f"{kind}({', '.join(f'{k}={v!r}' for k, v in kw.items())}) m=8 n=1e6 {detail}")
            return None
        ok = per(kernels) <= limit and per(h2d) <= 1
        return ok, f"(targets: <= {limit} kernels, <= 1 host-to-device copy) {detail}"
    return body


def run_activity(name: str, body) -> None:
    try:
        r = body()
    except Exception as e:
        traceback.print_exc()
        r = (False, first_line(e))
    if r is not None:
        report(name, *r)


# ---- timing (informational) --------------------------------------------------------------------

def timing(name: str, make_fn: Callable[[], Callable], reps: int = 100) -> None:
    """Median time per call, eager against graph replay (CUDA events)."""
    try:
        fn = make_fn()
        cap = Captured(fn)

        def med(call):
            for _ in range(10):
                call()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                call()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) * 1e3)
            return statistics.median(ts)

        te, tg = med(fn), med(cap.graph.replay)
        print(f"TIME  {name}: eager {te:.1f} us, graph replay {tg:.1f} us ({te / tg:.1f}x)", flush=True)
    except Exception as e:
        print(f"TIME  {name}: failed: {first_line(e)}", flush=True)


def timing_cases() -> list[tuple[str, Callable]]:
    import fusedjd
    out = []
    for m, n in [(8, 10**5), (8, 10**7)]:
        for label, make in [("GradVac(draws='device')", lambda: fusedjd.GradVac(draws="device")),
                            ("MoCo", lambda: fusedjd.MoCo())]:
            def make_fn(m=m, n=n, make=make):
                J = torch.randn(m, n, device=DEV)
                agg = make()
                agg(J)
                return lambda: agg(J)
            out.append((f"{label} m={m} n={n:.0e}", make_fn))
    return out


# ---- the list --------------------------------------------------------------------------------------

def cases() -> list[tuple[str, str, Callable]]:
    """(kind, name, body): kind "case" reports PASS/FAIL, "activity" may report INFO only."""
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    c = []
    for dtype in [f32, f64, f16, bf16]:
        c.append(("case", f"graph: ops gramian -> gradvac_loop -> combine {str(dtype)[6:]} m=8 blocks [300001, 700000] "
                  "groups [250000, 0, 750001]", ops_loop_pipeline(dtype, 8, [300001, 700000], [250000, 0, 750001])))
    c.append(("case", "graph: ops gramian -> gradvac_loop -> combine float32 m=20, 1000 groups of 50",
              ops_loop_pipeline(f32, 20, [50000], [50] * 1000)))
    c.append(("case", "graph: ops gramian -> gradvac_loop -> combine float32 m=64 blocks [4099, 5001]",
              ops_loop_pipeline(f32, 64, [4099, 5001], [9100])))
    c.append(("case", "graph: ops gramian -> pcgrad_loop -> combine float32 m=8 groups [400000, 600001]",
              ops_loop_pipeline(f32, 8, [1000001], [400000, 600001], pcgrad=True)))
    for dtype, proj, gram in [(f32, False, False), (f32, True, False), (bf16, False, False), (f32, False, True)]:
        c.append(("case", f"graph: ops moco_step {str(dtype)[6:]} m=8 n=1000003 "
                  f"{'projection' if proj else 'softmax'}{' with moco_gramian' if gram else ''}",
                  ops_moco_pipeline(dtype, 8, 1000003, proj, gram)))
    for pcgrad in (False, True):
        c.append(("case", f"graph: ops draw_perms_device -> aggregate {'PCGrad' if pcgrad else 'GradVac'} m=8 "
                  "groups [300000, 700003], same CUDA seed",
                  ops_aggregate_device_perms(8, 10**6 + 3, [300000, 700003], pcgrad)))
    for dtype in [f32, bf16]:
        c.append(("case", f"graph: MoCo {str(dtype)[6:]} m=8 n=1000003", moco_class("MoCo", dtype, 8, 1000003)))
    c.append(("case", "graph: MoCo float32 m=20 n=30001 projection",
              moco_class("MoCo", f32, 20, 30001, simplex="projection")))
    c.append(("case", "graph: MoCoWeighting float32 m=8 n=200003", moco_class("MoCoWeighting", f32, 8, 200003)))
    for kind, sizes in [("GradVac", None), ("PCGrad", None), ("GroupedGradVac", [4001] * 18),
                        ("GradVacWeighting", None), ("PCGradWeighting", None)]:
        n = 18 * 4001 if sizes else 10**6 + 3
        c.append(("case", f"graph: {kind}(draws='device') m=8 n={n}: replays equal eager under the same CUDA seed",
                  device_draws_vs_eager(kind, 8, n, sizes)))
    for kind, groups in [("GradVac", 1), ("PCGrad", 1), ("GroupedGradVac", 3), ("GradVacWeighting", 1),
                         ("PCGradWeighting", 1)]:
        c.append(("case", f"draws: {kind}(draws='device') m=4, one J replayed 3 times: valid orders, new each replay",
                  device_draws_valid_and_fresh(kind, groups=groups)))
    for kind in ["GradVac", "MoCo", "UPGrad"]:
        for via in ["direct", "jac_to_grad"]:
            how = "called directly" if via == "direct" else "through fusedjd.jac_to_grad"
            c.append(("case", f"no host sync: {kind} step {how} m=8 n=1e6", no_host_sync(kind, via)))
    for kind, limit in [("GradVac", 5), ("PCGrad", 5), ("MoCo", 4)]:
        c.append(("activity", f"launches: {kind}() m=8 n=1e6", activity_per_step(kind, limit)))
    for kind in ["GradVac", "PCGrad"]:
        c.append(("activity", f"launches: {kind}(draws='device')", activity_per_step(kind, None, draws="device")))
    for kind in ["GradVac", "PCGrad", "GroupedGradVac", "GradVacWeighting", "PCGradWeighting"]:
        c.append(("case", f"refusal: {kind}() (host draws) refuses a CUDA-graph capture, naming draws=\"device\"",
                  refuses_capture(kind)))
    c.append(("case", "refusal: ops.aggregate without orders refuses a capture, or draws new orders per replay",
              aggregate_host_draws_capture()))
    return c


def main() -> int:
    if "--list" in sys.argv[1:]:
        for kind, name, _ in cases():
            print(f"{kind:8s} {name}")
        for name, _ in timing_cases():
            print(f"timing   {name}")
        return 0
    from fusedjd import ops
    assert torch.cuda.is_available() and ops.has_cuda_kernels(), "needs a GPU and a CUDA build of fusedjd"
    if "--timing" in sys.argv[1:]:
        for name, make_fn in timing_cases():
            timing(name, make_fn)
        return 0
    t0 = time.perf_counter()
    for kind, name, body in cases():
        if kind == "case":
            run_case(name, body)
        else:
            run_activity(name, body)
    failed = [r for r in results if not r[1]]
    print(f"graph check: {len(results) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
