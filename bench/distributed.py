"""Sharded aggregation on torch.distributed: what a step costs when the Jacobian's columns are
split over the ranks, against gathering the Jacobian on one rank, and against the DDP layout.

    python bench/distributed.py            # 2 gloo processes on this machine, 1 thread each
    python bench/distributed.py --save     # also update bench/results/distributed-cpu.md

For each case, per step (median over repetitions, every rank starting together after a barrier):
- sharded: each rank holds m x n/2 columns; fusedjd with process_group (one all-reduce of the
  k m^2 Gramian, plus the broadcast visit orders), each rank gets its half of the gradient;
- gather: the halves are gathered on rank 0, aggregated there on the whole m x n Jacobian, and
  the gradient halves scattered back;
- DDP layout: each rank holds a whole m x n Jacobian (its own batch); they are all-reduced, then
  every rank aggregates the mean locally.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedjd

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
REPS = 7


def _timed(fn) -> float:
    """Median over REPS of fn(), every rank starting together; the slowest rank's time."""
    fn()
    times = []
    for _ in range(REPS):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def _worker(rank: int, port: int, cases: list, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    group = dist.group.WORLD
    rows = []
    for name, m, n in cases:
        make = {"GradVac": fusedjd.GradVac, "MoCo": fusedjd.MoCo}[name]
        gen = torch.Generator().manual_seed(rank)
        half = n // WORLD
        local = torch.randn(m, half, generator=gen)
        sharded = make(process_group=group)
        whole = make()

        def gather():
            bufs = [torch.empty_like(local) for _ in range(WORLD)] if rank == 0 else None
            dist.gather(local, bufs, dst=0)
            parts = list(whole(torch.cat(bufs, dim=1)).split(half)) if rank == 0 else None
            mine = torch.empty(half)
            dist.scatter(mine, parts, src=0)
            return mine

        full = torch.randn(m, half * WORLD, generator=gen)
        ddp_agg = make()

        def ddp():
            J = full.clone()
            dist.all_reduce(J)
            return ddp_agg(J / WORLD)

        t_sharded = _timed(lambda: sharded(local))
        t_gather = _timed(gather)
        t_ddp = _timed(ddp)
        t_local = _timed(lambda: whole(local))  # the same work on one rank, no communication
        rows.append((name, m, n, t_sharded, t_gather, t_ddp, t_local))
    if rank == 0:
        torch.save(rows, os.path.join(out, "rows.pt"))
    dist.destroy_process_group()


def _fmt(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} µs"


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", action="store_true", help="write bench/results/distributed-cpu.md (else results/local/)")
    args = ap.parse_args()
    cases = [("GradVac", 8, 10**6), ("GradVac", 8, 4 * 10**6), ("MoCo", 8, 4 * 10**6)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(port, cases, out), nprocs=WORLD, start_method="spawn")
        rows = torch.load(os.path.join(out, "rows.pt"), weights_only=False)
    lines = [
        f"# fusedjd sharded aggregation — CPU, {WORLD} gloo processes on one machine, 1 thread each",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; "
        f"command: `{' '.join(['python bench/distributed.py', *sys.argv[1:]])}`",
        "- time: median per step of the slowest rank; payload: the bytes the step's collectives carry "
        "(sharded: the all-reduced k·m² float32 Gramian, and GradVac's broadcast int64 visit orders; gather: "
        "the other rank's m × n/2 half of J and its n/2 gradient back; DDP: the all-reduced m × n J)",
        "",
        "| aggregator | m | n | sharded (process_group) | gather J on rank 0, aggregate, scatter | DDP layout: all-reduce J, "
        "aggregate | one rank's half alone, no communication | payload: sharded / gather / DDP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m, n, ts, tg, td, tl in rows:
        k = 1
        sharded_bytes = k * m * m * 4 + (k * m * (m - 1) * 8 if name == "GradVac" else 0)
        gather_bytes = (WORLD - 1) * (m * n // WORLD * 4 + n // WORLD * 4)
        ddp_bytes = m * n * 4
        lines.append(f"| {name} | {m} | {n:,} | {_fmt(ts)} | {_fmt(tg)} | {_fmt(td)} | {_fmt(tl)} | "
                     f"{_mib(sharded_bytes)} / {_mib(gather_bytes)} / {_mib(ddp_bytes)} |")
    report = "\n".join(lines) + "\n"
    folder = os.path.join(HERE, "results") if args.save else os.path.join(HERE, "results", "local")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "distributed-cpu.md")
    with open(path, "w") as fh:
        fh.write(report)
    print(report)
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
