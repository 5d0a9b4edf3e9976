"""DualProj (and its weighting): torchjd's classes on the fused route (the Gramian, the weighting with
:class:`~fusedjd.Projector` as its default projector, the combination)."""

from __future__ import annotations

from torch import Tensor
from torchjd import aggregation as ta
from torchjd.aggregation import GramianWeightedAggregator
from torchjd.linalg import DualConeProjector

from ._distributed import ProcessGroup
from ._fused import _GramianWeighted
from ._projector import _FusedDefault


class DualProjWeighting(_FusedDefault, ta.DualProjWeighting):
    """:class:`torchjd.aggregation.DualProjWeighting` with :class:`~fusedjd.Projector` as its
    default projector.

    :param pref_vector: The preference vector to use (default: the mean).
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`; ``None``: ``fusedjd.Projector()``.
    """


class DualProj(_GramianWeighted, ta.DualProj):
    """:class:`torchjd.aggregation.DualProj` on the fused route, as :class:`~fusedjd.UPGrad`: the
    fused Gramian, the weighting with :class:`~fusedjd.Projector` as its default projector, the
    fused combination.

    :param pref_vector: The preference vector used to combine the rows (default: the mean).
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`; ``None``: ``fusedjd.Projector()``.
    :param process_group: Sharded aggregation, as for :class:`~fusedjd.GradVac`: the matrix is this
        rank's columns of the Jacobian, the Gramian is summed over the group, every rank weighs it
        (the first rank's weights count), and the result is this rank's part of the aggregated
        gradient.
    """

    def __init__(self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None, *,
                 process_group: ProcessGroup | None = None) -> None:
        GramianWeightedAggregator.__init__(self, DualProjWeighting(pref_vector, projector=projector))
        self.process_group = process_group
        self._fuse_weighting()
