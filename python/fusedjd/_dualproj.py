"""DualProj (and its weighting): torchjd's classes on the fused route (the Gramian, the weighting with
:class:`~fusedjd.Projector` as its default projector, the combination)."""

from __future__ import annotations

from torchjd import aggregation as ta

from ._projector import _FusedDefault, _Projected


class DualProjWeighting(_FusedDefault, ta.DualProjWeighting):
    """:class:`torchjd.aggregation.DualProjWeighting` with :class:`~fusedjd.Projector` as its
    default projector.

    :param pref_vector: The preference vector to use (default: the mean).
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`; ``None``: ``fusedjd.Projector()``.
    """


class DualProj(_Projected, ta.DualProj):
    """:class:`torchjd.aggregation.DualProj` on the fused route, as :class:`~fusedjd.UPGrad`: the
    fused Gramian, the weighting with :class:`~fusedjd.Projector` as its default projector, the
    fused combination.

    :param pref_vector: The preference vector used to combine the rows (default: the mean).
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`; ``None``: ``fusedjd.Projector()``.
    :param process_group: Sharded aggregation, as for :class:`~fusedjd.GradVac` (the first rank's
        weights count).
    """

    _weighting = DualProjWeighting
