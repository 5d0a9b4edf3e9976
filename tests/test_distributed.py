"""Sharded aggregation over torch.distributed (gloo, CPU): 2 and 3 processes, each holding some
column blocks of the Jacobian, against the single-process result on the whole Jacobian.

Every collective has a timeout, the processes are joined against a deadline and killed past it:
a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchjd.aggregation import UPGrad
from torchjd.autojac import mtl_backward

import fusedjd
from fusedjd.reference import rel_err

M = 4
WIDTHS = [5, 17, 1, 30, 8]  # the column blocks ("parameters"), in global column order
BLOCK_GROUPS = [[0, 1], [2, 3], [4]]  # GroupedGradVac's groups: whole blocks
OWNERS = {  # rank -> the blocks it holds; with 3 ranks, ranks 0 and 2 hold no column of some groups
    2: [[0, 3], [1, 2, 4]],
    3: [[0, 1], [2, 3], [4]],
}
SUBGROUP_OWNERS = [[0, 1, 2], [3, 4]]  # the blocks of global ranks 1 and 2 in the group [1, 2]
STEPS = 10
NAN_STEP = 6  # a NaN in a block of the last rank: every rank must refuse the step
DEADLINE_S = 240


def _jacobians(step: int, dtype: torch.dtype, nan: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    blocks = [torch.randn(M, w, generator=gen, dtype=torch.float64).to(dtype) for w in WIDTHS]
    blocks[0][:, :2] *= 1e3  # scaled columns
    if nan and step == NAN_STEP:
        blocks[4][1, 3] = float("nan")
    return blocks


def _group_sizes(blocks: list[int]) -> list[int]:
    return [sum(WIDTHS[b] for b in g if b in blocks) for g in BLOCK_GROUPS]


def _aggregators(group):
    """name -> (make(group), the matrix API works, NaN steps included)."""
    kw = {} if group is None else {"process_group": group}
    return {
        "GradVac": (lambda blocks: fusedjd.GradVac(beta=0.3, **kw), True, True),
        "PCGrad": (lambda blocks: fusedjd.PCGrad(**kw), True, True),
        "GroupedGradVac": (lambda blocks: fusedjd.GroupedGradVac(_group_sizes(blocks), beta=0.4, **kw), True, True),
        "MoCo": (lambda blocks: fusedjd.MoCo(gamma=0.5, simplex="projection", **kw), True, True),
        "UPGrad": (lambda blocks: UPGrad(), False, False),
        "fusedjd UPGrad": (lambda blocks: fusedjd.UPGrad(**kw), True, False),
        "fusedjd MGDA": (lambda blocks: fusedjd.MGDA(**kw), True, False),
    }


def _run_matrix(name, make, blocks, dtype, nan, rank=0):
    """STEPS calls of the aggregator on the owned blocks' columns; returns [(weights|None, out)].
    Each rank seeds its generator differently: only the first rank's draws may count."""
    torch.manual_seed(7 + 7919 * rank)
    agg = make(blocks)
    outs = []
    for step in range(STEPS):
        J = _jacobians(step, dtype, nan)
        local = torch.cat([J[b] for b in blocks], dim=1)
        outs.append(agg(local))
    outs.append(torch.rand(1))  # where the generator stands: the first rank's must be one process's
    return outs, agg


def _run_jac_to_grad(name, make, blocks, dtype, nan, group, rank=0):
    """STEPS calls of fusedjd.jac_to_grad on one tensor per owned block."""
    torch.manual_seed(7 + 7919 * rank)
    agg = make(blocks)
    params = [torch.zeros(WIDTHS[b], dtype=dtype, requires_grad=True) for b in blocks]
    outs = []
    for step in range(STEPS):
        J = _jacobians(step, dtype, nan)
        for p, b in zip(params, blocks):
            p.grad = None
            p.__setattr__("jac", J[b].clone())
        w = fusedjd.jac_to_grad(params, agg, process_group=group)
        outs.append((w, torch.cat([p.grad for p in params])))
    outs.append(torch.rand(1))
    return outs


def _state(agg) -> dict:
    return {k: v.clone() for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}


# ---- the workers -----------------------------------------------------------------------------


class _TwoTasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))


def _train(rank_owned: list[int] | None, group, steps: int = 15):
    """A multi-task regression trained with GradVac: the shared parameters are split over the ranks
    (each rank takes the .jac of its own and steps them; their owners broadcast them), or all held
    by one process when rank_owned is None. Returns the losses and the final parameters."""
    torch.manual_seed(3)
    net = _TwoTasks().double()
    shared = list(net.shared.parameters())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    ys = [torch.sin(x @ torch.randn(6, generator=gen, dtype=torch.float64)) for _ in range(3)]
    owned = range(len(shared)) if rank_owned is None else rank_owned
    agg = fusedjd.GradVac(process_group=group)
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        f = net.shared(x)
        task_losses = [((h(f).squeeze(-1) - y) ** 2).mean() for h, y in zip(net.heads, ys)]
        losses.append(sum(loss.item() for loss in task_losses))
        mine = [shared[i] for i in owned]
        mtl_backward(task_losses, features=f, shared_params=mine)
        fusedjd.jac_to_grad(mine, agg)
        opt.step()
        if group is not None:  # the owners broadcast their parameters
            world = dist.get_world_size(group)
            for i, p in enumerate(shared):
                dist.broadcast(p.data, src=i % world, group=group)
    return losses, [p.detach().clone() for p in net.parameters()]


def _compiled_vs_eager(group, blocks: list[int]) -> dict:
    """Sharded GradVac, PCGrad and MoCo under torch.compile(fullgraph=True) (the collectives are
    traceable) against eager, over 3 steps: the largest relative difference of each."""
    diffs = {}
    for name in ("GradVac", "PCGrad", "MoCo"):
        make = _aggregators(group)[name][0]
        eager, compiled = make(blocks), make(blocks)
        torch._dynamo.reset()
        fn = torch.compile(lambda J: compiled(J), fullgraph=True)
        worst = 0.0
        for step in range(3):
            J = _jacobians(step, torch.float32, False)
            local = torch.cat([J[b] for b in blocks], dim=1)
            torch.manual_seed(step)
            e = eager(local)
            torch.manual_seed(step)
            worst = max(worst, rel_err(fn(local), e))
        diffs[name] = worst
    return diffs


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.group.WORLD
        blocks = OWNERS[world][rank]
        results = {}
        for dtype in (torch.float64, torch.float32):
            for name, (make, matrix_api, nan) in _aggregators(group).items():
                if matrix_api:
                    outs, agg = _run_matrix(name, make, blocks, dtype, nan, rank)
                    results[("matrix", name, dtype)] = (outs, _state(agg))
                results[("jac_to_grad", name, dtype)] = _run_jac_to_grad(name, make, blocks, dtype, nan, group, rank)
        if world == 2:
            results["train"] = _train([i for i in range(6) if i % world == rank], group)
            results["compiled"] = _compiled_vs_eager(group, blocks)
        if world == 3:  # a group that does not start at rank 0: ranks 1 and 2
            sub = dist.new_group([1, 2], timeout=datetime.timedelta(seconds=60))
            if rank in (1, 2):
                for name in ("GradVac", "PCGrad", "UPGrad"):
                    make, _, nan = _aggregators(sub)[name]
                    mine = SUBGROUP_OWNERS[rank - 1]
                    results[("subgroup", name)] = _run_jac_to_grad(name, make, mine, torch.float64, nan, sub, rank)
        results["disagree"] = _disagreements(group, rank)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _disagreements(group, rank: int) -> dict:
    """Ranks that disagree (rank 0 differs from the others) on m, the dtype, the aggregator or the
    number of column groups: each case's exception on this rank, whether the state of the
    aggregator this rank called was left as it was (vacuous where that one is fresh or stateless:
    rank 0's GroupedGradVac in "k", the others' PCGrad in "aggregator"), and then a call on which
    the ranks agree (the group must still work). Then hooks and jac_to_grad."""
    gen = torch.Generator().manual_seed(rank)
    J = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    odd = rank == 0
    pcgrad = fusedjd.PCGrad(process_group=group)
    cases = {  # (the aggregator, the call on which the ranks disagree)
        "m": (fusedjd.GradVac(process_group=group), lambda agg: agg(J[:3] if odd else J)),
        "dtype": (fusedjd.MoCo(process_group=group), lambda agg: agg(J.float() if odd else J)),
        "aggregator": (fusedjd.GradVac(process_group=group), lambda agg: agg(J) if odd else pcgrad(J)),
        "k": (fusedjd.GroupedGradVac([1, 2, 3], process_group=group),
              lambda agg: fusedjd.GroupedGradVac([2, 4], process_group=group)(J) if odd else agg(J)),
    }
    found = {}
    for case, (agg, disagree) in cases.items():
        torch.manual_seed(0)
        agg(J)  # a first step on which the ranks agree
        before = {k: v.clone() for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}
        try:
            disagree(agg)
            error = None
        except Exception as e:  # noqa: BLE001 - the test reads the type and the message
            error = (type(e).__name__, str(e))
        after = agg.state_dict()
        kept = all(torch.equal(v, after[k]) for k, v in before.items())
        torch.manual_seed(1)
        again = agg(J)  # the ranks agree again: the group still works
        found[case] = (error, kept, bool(torch.isfinite(again).all()))
    # a hook on rank 0's weighting only: the hooked forward makes the same collectives as the fused one
    agg = fusedjd.GradVac(process_group=group)
    if odd:
        agg.gramian_weighting.register_forward_hook(lambda *args: None)
    torch.manual_seed(2)
    found["hook on one rank"] = agg(J)
    # hooks on every rank, ranks disagreeing on m: the hooked forward checks too
    agg = fusedjd.GroupedGradVac([1, 2, 3], process_group=group)
    agg.gramian_weighting.register_forward_hook(lambda *args: None)
    try:
        agg(J[:3] if odd else J)
        found["hooked"] = None
    except ValueError as e:
        found["hooked"] = str(e)
    # jac_to_grad: a refused step leaves every .jac and .grad as they were
    p = torch.zeros(6, requires_grad=True)
    p.jac = (J[:3] if odd else J).clone()
    jac = p.jac.clone()
    try:
        fusedjd.jac_to_grad([p], fusedjd.MoCo(process_group=group))
        found["jac_to_grad"] = None
    except ValueError as e:
        found["jac_to_grad"] = (str(e), hasattr(p, "jac") and torch.equal(p.jac, jac), p.grad is None)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), out), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} processes did not finish within {DEADLINE_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def sharded(request):
    return request.param, _spawn(request.param)


# ---- the checks ------------------------------------------------------------------------------


def _tol(dtype, name=""):
    """float64: 1e-12. float32: the Gramian's float32 rounding differs between one sum and a sum
    of the ranks' sums; the GradVac loop carries it at about 1e-5, torchjd's UPGrad (a quadratic
    program on a Gramian whose scaled columns make it ill-conditioned) at about 1e-4."""
    if dtype == torch.float64:
        return 1e-12
    return 1e-3 if name.endswith("UPGrad") else 1e-4


def _assemble(world: int, per_rank: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' outputs (their owned blocks, in their order) put back in global column order."""
    pieces = {}
    for rank, out in enumerate(per_rank):
        start = 0
        for b in OWNERS[world][rank]:
            pieces[b] = out[start:start + WIDTHS[b]]
            start += WIDTHS[b]
        assert start == out.numel()
    return torch.cat([pieces[b] for b in range(len(WIDTHS))])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("api", ["matrix", "jac_to_grad"])
@pytest.mark.parametrize("name", list(_aggregators(None)))
def test_sharded_equals_single_process(sharded, name, api, dtype):
    world, results = sharded
    make, matrix_api, nan = _aggregators(None)[name]
    if api == "matrix" and not matrix_api:
        pytest.skip(f"{name} is torchjd's: it is sharded through fusedjd.jac_to_grad only")
    everything = list(range(len(WIDTHS)))
    if api == "matrix":
        ref_outs, ref_agg = _run_matrix(name, make, everything, dtype, nan)
        ref = [(None, o) for o in ref_outs]  # (the last entry: the generator's next draw)
    else:
        ref = _run_jac_to_grad(name, make, everything, dtype, nan, None)
    per_rank = [r[(api, name, dtype)] for r in results]
    for step in range(STEPS):
        if api == "matrix":
            outs = [r[0][step] for r in per_rank]
            weights = [None] * world
        else:
            weights = [r[step][0] for r in per_rank]
            outs = [r[step][1] for r in per_rank]
        got = _assemble(world, outs)
        expected = ref[step][1]
        if nan and step == NAN_STEP:  # refused on every rank, as on one process
            assert torch.isnan(got).all() and torch.isnan(expected).all(), step
            continue
        assert rel_err(got, expected) <= _tol(dtype, name), (step, rel_err(got, expected))
        if weights[0] is not None:
            assert all(torch.equal(w, weights[0]) for w in weights), "the ranks' weights differ"
            assert rel_err(weights[0], ref[step][0]) <= _tol(dtype, name)
    # the first rank consumed the default generator exactly as one process did
    first = per_rank[0][0] if api == "matrix" else per_rank[0]
    assert torch.equal(first[STEPS], ref[STEPS][1] if api == "matrix" else ref[STEPS])
    if api == "matrix":  # the state: identical on every rank, equal to one process's (MoCo's Y is sharded)
        states = [r[1] for r in per_rank]
        ref_state = _state(ref_agg)
        for key, value in ref_state.items():
            if key.endswith("_y"):
                got = torch.stack([_assemble(world, [s[key][i] for s in states]) for i in range(M)])
                assert rel_err(got, value) <= _tol(dtype)
                continue
            for s in states:
                assert torch.equal(s[key], states[0][key]), key
            assert rel_err(states[0][key], value) <= _tol(dtype), key


@pytest.mark.parametrize("name", ["GradVac", "PCGrad", "UPGrad"])
def test_a_group_that_does_not_start_at_rank_0(sharded, name):
    """Ranks 1 and 2 of 3 aggregate in the group [1, 2]: the visit orders come from the group's
    first rank (global rank 1), and the result is one process's with that rank's generator."""
    world, results = sharded
    if world != 3:
        pytest.skip("the subgroup runs with 3 ranks")
    make, _, nan = _aggregators(None)[name]
    ref = _run_jac_to_grad(name, make, list(range(len(WIDTHS))), torch.float64, nan, None, rank=1)
    per_rank = [results[r][("subgroup", name)] for r in (1, 2)]
    for step in range(STEPS):
        got = torch.cat([per_rank[0][step][1], per_rank[1][step][1]])  # blocks 0-2, then 3-4: global order
        if nan and step == NAN_STEP:
            assert torch.isnan(got).all()
            continue
        assert rel_err(got, ref[step][1]) <= 1e-12, step
        assert torch.equal(per_rank[0][step][0], per_rank[1][step][0])
    assert torch.equal(per_rank[0][STEPS], ref[STEPS])


def test_compiled_sharded_step_matches_eager(sharded):
    world, results = sharded
    if world != 2:
        pytest.skip("compiled with 2 ranks")
    for rank in range(world):
        for name, diff in results[rank]["compiled"].items():
            assert diff <= 1e-5, (rank, name, diff)


def test_training_with_parameters_split_over_two_ranks(sharded):
    world, results = sharded
    if world != 2:
        pytest.skip("the training loop runs with 2 ranks")
    ref_losses, ref_params = _train(None, None)
    for rank in range(world):
        losses, params = results[rank]["train"]
        assert losses[-1] < 0.7 * losses[0], losses
        assert rel_err(torch.tensor(losses), torch.tensor(ref_losses)) < 1e-10
        for p, q in zip(params, ref_params):
            assert rel_err(p, q) < 1e-10


def test_refused_without_a_shardable_aggregator():
    """An aggregator torchjd would take cannot shard: refused before anything is changed."""
    from torchjd.aggregation import Mean

    p = torch.zeros(3, requires_grad=True)
    p.__setattr__("jac", torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"needs an aggregator it can shard"):
        fusedjd.jac_to_grad([p], Mean(), process_group=object())
    assert hasattr(p, "jac") and p.grad is None


def test_ranks_that_disagree_get_the_same_clear_error(sharded):
    """Ranks disagreeing on m, the dtype, the aggregator or the number of groups used to abort rank
    0 inside gloo's size check: now every rank raises the same ValueError, naming what differs,
    before anything changes, and the group keeps working."""
    world, results = sharded
    expected_words = {"m": "m (the number of rows): 3 on some ranks, 4 on others",
                      "dtype": "the dtype: torch.float32 on some ranks, torch.float64 on others",
                      "aggregator": "the aggregator: GradVac on some ranks, PCGrad on others",
                      "k": "k (the number of column groups): 2 on some ranks, 3 on others"}
    for case, words in expected_words.items():
        errors = [results[r]["disagree"][case][0] for r in range(world)]
        for rank in range(world):
            error, kept, works = results[rank]["disagree"][case]
            assert error is not None and error[0] == "ValueError", (case, rank, error)
            assert words in error[1], (case, error[1])
            assert "`process_group`" in error[1]
            assert kept, (case, rank)
            assert works, (case, rank)
        assert len({e[1] for e in errors}) == 1, errors  # the same message on every rank


def test_ranks_that_disagree_through_hooks_and_jac_to_grad(sharded):
    """The check runs on the hooked forward as on the fused one (a hook on one rank only changes
    nothing), and a step jac_to_grad refuses keeps .jac and .grad."""
    world, results = sharded
    hooked = [results[r]["disagree"]["hook on one rank"] for r in range(world)]
    for r in range(world):
        assert torch.isfinite(hooked[r]).all()
        assert "m (the number of rows): 3 on some ranks, 4 on others" in results[r]["disagree"]["hooked"]
        message, jac_kept, grad_untouched = results[r]["disagree"]["jac_to_grad"]
        assert "m (the number of rows): 3 on some ranks, 4 on others" in message
        assert jac_kept and grad_untouched, r
