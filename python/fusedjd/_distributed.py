"""Sharded aggregation over torch.distributed: the few collectives the aggregators use.

When each rank holds some columns of the Jacobian (its parameter shard), the Gramian of the
whole Jacobian is the sum of the ranks' local Gramians: one all-reduce of ``k·m²`` numbers gives
every rank the exact Gramian, every rank runs the same loop on it, and each rank combines its own
columns into its own part of the gradient. The visit orders of GradVac and PCGrad are drawn on
the group's first rank (from its default generator, exactly as a single process draws them) and
broadcast, so the ranks' weights and targets stay identical. The collectives are torch's
traceable ones (``torch.distributed._functional_collectives``), so a compiled step keeps them in
its graph; they wait for nothing but the data they move.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

from . import ops

ProcessGroup = dist.ProcessGroup


def all_reduce_sum(t: Tensor, group: ProcessGroup | None, aggregator: str | None = None) -> Tensor:
    """``t`` summed over the ranks of ``group`` (``t`` itself when ``group`` is None). With
    ``aggregator``, ``t`` is the step's Gramians ``[k, m, m]`` and the ranks' agreement on them
    (:func:`check_agreement`) is checked first: every sharded step of GradVac, PCGrad, GroupedGradVac
    and a torchjd weighting starts here, hooked or not, so every rank makes the same collectives."""
    if group is None:
        return t
    if aggregator is not None:
        check_agreement(group, aggregator, t.shape[-1], t.shape[0], t.dtype, t.device)
    return funcol.all_reduce(t, "sum", group)


# What every rank of a group must agree on before a sharded step, in the order of the check's
# tensor; the aggregators and dtypes by their index in these tuples.
_AGREED = ("the aggregator", "m (the number of rows)", "k (the number of column groups)", "the dtype")
_AGGREGATORS = ("GradVac", "PCGrad", "MoCo", "a torchjd weighting")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_agreement(group: ProcessGroup | None, aggregator: str, m: int, k: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Raises the same ``ValueError`` on every rank of ``group`` when the ranks disagree on the
    aggregator, ``m``, ``k`` or the dtype (of the Gramians: float32 for the half types): one
    all-reduce of 8 integers before the step's payload
    (whose collectives would otherwise abort the process, or wait for the group's timeout, when
    the sizes differ). A host synchronisation in eager mode; skipped under ``torch.compile``,
    where a mismatch is not detected."""
    if group is None or torch.compiler.is_compiling():
        return
    mine = [_AGGREGATORS.index(aggregator), m, k, _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)]
    on = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    both = torch.tensor(mine + [-v for v in mine], dtype=torch.int64, device=on)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    values = both.tolist()  # sync-ok: the agreement check of a sharded eager step
    high, low = values[:4], [-v for v in values[4:]]
    if high == low:
        return

    def name(field: int, v: int) -> str:
        if field == 0:
            return _AGGREGATORS[v]
        if field == 3:
            return str(_DTYPES[v]) if v < len(_DTYPES) else "another dtype"
        return str(v)

    differ = "; ".join(f"{_AGREED[f]}: {name(f, low[f])} on some ranks, {name(f, high[f])} on others"
                       for f in range(4) if high[f] != low[f])
    raise ValueError(
        f"The ranks of `process_group` disagree on what they aggregate ({differ}). Every rank must call "
        f"the same aggregator on a Jacobian with the same rows, column groups and dtype; nothing was changed.")


def sharded_aggregate(J: Tensor | list[Tensor], sizes: list[int], group: ProcessGroup | None,
                      weigh: Callable[[Tensor], Tensor], aggregator: str) -> tuple[Tensor, Tensor]:
    """The aggregation of a shard ``J`` of the columns: its Gramians [k, m, m] summed over
    ``group`` (none: this process's alone), weighed by ``weigh`` (to weights [k, m], the same on
    every rank), and this shard's combination: ``(combination, weights)``. The ranks' agreement
    (:func:`check_agreement`) is checked before the Gramians' all-reduce."""
    W = weigh(all_reduce_sum(ops.gramian(J, sizes), group, aggregator))
    return ops.combine(J, W, sizes), W


def from_first_rank(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """The first rank's ``t`` on every rank of ``group`` (every rank passes a tensor of the same
    shape; ``t`` itself when ``group`` is None or ``t`` is empty)."""
    if group is None or t.numel() == 0:
        return t
    return funcol.broadcast(t, 0, group)  # (the functional broadcast's source is a rank in the group)


def draw_perms(k: int, m: int, pcgrad: bool, device: torch.device, group: ProcessGroup | None,
               draws: str = "torchjd") -> Tensor:
    """:func:`fusedjd.ops.draw_perms` (``draws="torchjd"``) or :func:`fusedjd.ops.draw_perms_device`
    (``draws="device"``), drawn on the first rank of ``group`` and broadcast: only that rank's
    generator advances, exactly as a single process's would."""

    def draw() -> Tensor:
        if draws == "device":
            return ops.draw_perms_device(k, m, device)
        return ops.draw_perms(k, m, pcgrad=pcgrad, device=device)

    if group is None:
        return draw()
    if dist.get_rank(group) == 0:
        perms = draw()
    else:
        perms = torch.empty((k, m, max(m - 1, 0)), dtype=torch.long, device=device)
    return from_first_rank(perms, group)
