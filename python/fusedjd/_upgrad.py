"""UPGrad (and its weighting): torchjd's classes on the fused route (the Gramian, the weighting with
:class:`~fusedjd.Projector` as its default projector, the combination)."""

from __future__ import annotations

from torchjd import aggregation as ta

from ._projector import _FusedDefault, _Projected


class UPGradWeighting(_FusedDefault, ta.UPGradWeighting):
    """:class:`torchjd.aggregation.UPGradWeighting` with :class:`~fusedjd.Projector` as its default
    projector: same arguments and results (to the solver's precision), no quadprog, no host
    round trip.

    :param pref_vector: The preference vector to use (default: the mean).
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`; ``None``: ``fusedjd.Projector()``.
    """


class UPGrad(_Projected, ta.UPGrad):
    """:class:`torchjd.aggregation.UPGrad` (Jacobian descent's flagship aggregator) on the fused
    route: the Gramian (:func:`fusedjd.ops.gramian`, float32 for float32 and half-precision
    matrices), the weighting with :class:`~fusedjd.Projector` as its default projector, and the
    combination (:func:`fusedjd.ops.combine`); switching is changing the import. The same route
    serves ``forward``, :func:`fusedjd.jac_to_grad` and sharded aggregation; on CUDA a step has no
    host synchronisation. Hooks on ``weighting`` or ``gramian_weighting`` run, as in torchjd.

    :param pref_vector: The preference vector used to combine the projected rows (default: the
        mean).
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`; ``None``: ``fusedjd.Projector()``.
    :param process_group: Sharded aggregation, as for :class:`~fusedjd.GradVac` (the first rank's
        weights count).
    """

    _weighting = UPGradWeighting
