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


def all_reduce_sum(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """``t`` summed over the ranks of ``group`` (``t`` itself when ``group`` is None)."""
    return t if group is None else funcol.all_reduce(t, "sum", group)


def sharded_aggregate(J: Tensor | list[Tensor], sizes: list[int], group: ProcessGroup | None,
                      weigh: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The aggregation of a shard ``J`` of the columns: its Gramians [k, m, m] summed over
    ``group`` (none: this process's alone), weighed by ``weigh`` (to weights [k, m], the same on
    every rank), and this shard's combination: ``(combination, weights)``."""
    W = weigh(all_reduce_sum(ops.gramian(J, sizes), group))
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
