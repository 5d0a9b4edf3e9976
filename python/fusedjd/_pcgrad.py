"""PCGrad (and its weighting): a drop-in replacement for torchjd's, on fused kernels."""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import GramianWeightedAggregator, Weighting

from . import _distributed, ops
from ._distributed import ProcessGroup
from ._fused import _GramianWeighted
from ._state import _NonDifferentiable
from ._validation import check_square, draws_mode, draws_repr, forwarded


class PCGradWeighting(Weighting, _NonDifferentiable):
    """
    :class:`~torchjd.aggregation.Weighting` giving the weights of :class:`~fusedjd.PCGrad`,
    computed from the Gramian by a C++/CUDA kernel; equal to
    :class:`torchjd.aggregation.PCGradWeighting` under the same ``torch.manual_seed``.

    :param draws: Where the visit orders are drawn, as for :class:`~fusedjd.GradVacWeighting`.
    """

    def __init__(self, *, process_group: ProcessGroup | None = None, draws: str = "torchjd") -> None:
        super().__init__()
        self.draws = draws
        self.process_group = process_group

    draws = draws_mode()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({draws_repr(self.draws)[2:]})"

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_square(gramian)
        return self.pcgrad(gramian, self.process_group)

    def pcgrad(self, gramian: Tensor, group: ProcessGroup | None) -> Tensor:
        """The PCGrad weights ``[m]`` of a checked Gramian ``[m, m]`` (visit orders drawn on the
        first rank of ``group`` when there is one)."""
        G = gramian.to(ops.acc_dtype(gramian.dtype)).unsqueeze(0)
        perms = _distributed.draw_perms(1, G.shape[1], True, G.device, group, self._draws)
        return ops.pcgrad_loop(G, perms)[0]

    def aggregate(self, J: list[Tensor], group_sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
        """Gramians, weights and combination of ``J`` (its column blocks) over its column groups
        (PCGrad has one: ``[n]``): ``(combination [n], weights [k, m])``. On one process, one call
        (``ops.aggregate``); with ``group``, this rank's columns, the Gramians summed over the
        group."""
        if group is not None:
            return _distributed.sharded_aggregate(
                J, group_sizes, group, lambda G: torch.stack([self.pcgrad(g, group) for g in G]), "PCGrad")
        perms = ops.draw_perms_device(len(group_sizes), J[0].shape[0], J[0].device) if self._draws == "device" else None
        return ops.aggregate(J, group_sizes, None, 0.0, 0.0, True, perms)


class PCGrad(_GramianWeighted, GramianWeightedAggregator, _NonDifferentiable):
    """
    :class:`~torchjd.aggregation.GramianWeightedAggregator` as defined in Algorithm 1 of
    `Gradient Surgery for Multi-Task Learning <https://arxiv.org/pdf/2001.06782.pdf>`_, a drop-in
    replacement for :class:`torchjd.aggregation.PCGrad` on fused kernels.

    :param process_group: Sharded aggregation, as for :class:`~fusedjd.GradVac`.
    :param draws: Where the visit orders are drawn, as for :class:`~fusedjd.GradVac`.
    """

    gramian_weighting: PCGradWeighting

    def __init__(self, *, process_group: ProcessGroup | None = None, draws: str = "torchjd") -> None:
        super().__init__(PCGradWeighting(process_group=process_group, draws=draws))
        self._fuse_weighting()

    draws = forwarded("draws", to="gramian_weighting")
    process_group = forwarded("process_group", to="gramian_weighting")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({draws_repr(self.draws)[2:]})"

    _agreement = "PCGrad"
    _broadcasts_weights = False

    def _fused(self, blocks: list[Tensor], sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
        # the Gramian, the loop and the combination in one call (ops.aggregate) on one process
        return self._modules["gramian_weighting"].aggregate(blocks, [sum(sizes)], group)
