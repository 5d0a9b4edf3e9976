"""GroupedGradVac: GradVac on each column group of the Jacobian, all groups in one launch."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchjd import Stateful
from torchjd.aggregation import Aggregator

from . import _distributed, ops
from ._distributed import ProcessGroup
from ._fused import _Fused
from ._gradvac import GradVacWeighting, _GradVacSettings
from ._state import _NonDifferentiable
from ._validation import check_group_sizes, check_sizes_cover, check_whole_tensors, draws_repr


class GroupedGradVac(_GradVacSettings, _Fused, Aggregator, Stateful, _NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Aggregator` applying GradVac
    independently to consecutive column groups of the Jacobian (the paper's ``whole_model``,
    ``enc_dec``, ``all_layer`` and ``all_matrix`` granularities; see :mod:`fusedjd.groups`).

    Each group has its own Gramian, EMA targets and visit orders; all groups run in one kernel
    launch. The permutations are drawn group by group, so the result equals torchjd's grouping
    recipe (one :class:`torchjd.aggregation.GradVac` per group, called in group order) under the
    same ``torch.manual_seed``.

    :param group_sizes: Number of columns of each group, in column order; must sum to ``n``.
        With a process group: this rank's columns of each group (0 where it holds none).
    :param beta: EMA rate for :math:`\hat{\phi}`, in [0, 1].
    :param eps: Small non-negative constant added to denominators.
    :param process_group: Sharded aggregation, as for :class:`~fusedjd.GradVac`: each group's
        Gramian is summed over the ranks.
    :param draws: Where the visit orders are drawn, as for :class:`~fusedjd.GradVac`.
    """

    def __init__(self, group_sizes: Sequence[int], beta: float = 0.5, eps: float = 1e-8, *,
                 process_group: ProcessGroup | None = None, draws: str = "torchjd") -> None:
        super().__init__()
        self.gramian_weighting = GradVacWeighting(beta=beta, eps=eps, process_group=process_group, draws=draws)
        self.group_sizes = group_sizes

    @property
    def group_sizes(self) -> list[int]:
        return list(self._group_sizes)

    @group_sizes.setter
    def group_sizes(self, value: Sequence[int]) -> None:
        self._group_sizes = check_group_sizes(value)
        self.gramian_weighting.reset()

    def _hook_modules(self) -> tuple[nn.Module, ...]:
        return (self._modules["gramian_weighting"],)

    def _hooked_forward(self, matrix: Tensor) -> Tensor:
        # the groups' Gramians [k, m, m] (summed over the process group), their weights [k, m]
        # through gramian_weighting's call, so that its hooks run, then the combination
        sizes = self._group_sizes
        G = _distributed.all_reduce_sum(ops.gramian(matrix, sizes), self.process_group, "GradVac")
        return ops.combine(matrix, self._modules["gramian_weighting"](G), sizes)

    def _check_matrix_columns(self, matrix: Tensor) -> None:
        check_sizes_cover(self._group_sizes, matrix)

    def _check_tensor_columns(self, sizes: list[int]) -> None:
        check_whole_tensors(self._group_sizes, sizes)

    def _fused(self, blocks: list[Tensor], sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, None]:
        return self._modules["gramian_weighting"].aggregate(blocks, self._group_sizes, group)[0], None

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(group_sizes={self._group_sizes!r}, beta={self.beta!r}, "
            f"eps={self.eps!r}{draws_repr(self.draws)})"
        )
