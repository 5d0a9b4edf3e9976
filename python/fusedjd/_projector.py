"""The fused dual-cone projector: :class:`Projector`, a :class:`torchjd.linalg.DualConeProjector` on
the ``dual_cone`` op, and the ``projector`` property that makes it UPGrad's and DualProj's default."""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import GramianWeightedAggregator
from torchjd.linalg import DualConeProjector

from . import ops
from ._distributed import ProcessGroup
from ._fused import _GramianWeighted
from ._validation import non_negative


class Projector(DualConeProjector):
    r"""
    :class:`~torchjd.linalg.DualConeProjector` solving its quadratic programs with fusedjd's
    ``dual_cone`` op (:func:`fusedjd.ops.dual_cone`): exact block principal pivoting on the Gramian in
    float64, all right-hand sides at once, on the Gramian's device (C++ on the CPU, one CUDA launch
    on a GPU, no host synchronisation, CUDA-graph safe). A drop-in replacement for
    :class:`torchjd.linalg.QuadprogProjector` with the same parameters and preprocessing::

        torchjd.aggregation.UPGrad(projector=fusedjd.Projector())

    The Gramian is first divided by its trace (replaced by zeros when the trace is below
    ``norm_eps``), then ``reg_eps · I`` is added, as torchjd's quadprog projector does; the
    problem is then strictly convex (for ``reg_eps > 0``) and its solution unique. A non-finite
    Gramian or ``U`` gives NaN weights instead of an exception.

    :param norm_eps: A small value to avoid division by zero when normalizing.
    :param reg_eps: A small value added to the diagonal of the normalized Gramian, making it
        positive definite.
    """

    def __init__(self, *, norm_eps: float = 0.0001, reg_eps: float = 0.0001) -> None:
        super().__init__()
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    norm_eps = non_negative("norm_eps")
    reg_eps = non_negative("reg_eps")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(norm_eps={self._norm_eps}, reg_eps={self._reg_eps})"

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        U, G = U.detach(), G.detach()  # not differentiable: torchjd's numpy round trip detaches too
        trace = G.diagonal().sum()
        # torchjd's normalize and regularize, in one pass over G and no host synchronisation: a
        # trace below norm_eps divides by inf (zeros; NaN where G is not finite), and reg_eps goes
        # onto the diagonal of the new tensor in place
        G = G / torch.where(trace < self._norm_eps, torch.inf, trace)
        G.diagonal().add_(self._reg_eps)
        return ops.dual_cone(U, G)


def _projector(value: DualConeProjector | None) -> DualConeProjector:
    """torchjd's ``projector_or_default`` with fusedjd's default (any other value is kept, as torchjd
    keeps it)."""
    return Projector() if value is None else value


class _FusedDefault:
    """torchjd's ``projector`` property with :class:`~fusedjd.Projector` as the default (for the
    weightings below, placed before torchjd's class)."""

    @property
    def projector(self) -> DualConeProjector:
        return self._projector

    @projector.setter
    def projector(self, value: DualConeProjector | None) -> None:
        self._projector = _projector(value)


class _Projected(_GramianWeighted):
    """UPGrad's and DualProj's shared constructor (placed before torchjd's class): torchjd's
    arguments, its weighting class (``_weighting``) with :class:`Projector` as the default
    projector, and a process group for sharded aggregation, on the fused route."""

    _weighting: type

    def __init__(self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None, *,
                 process_group: ProcessGroup | None = None) -> None:
        GramianWeightedAggregator.__init__(self, self._weighting(pref_vector, projector=projector))
        self.process_group = process_group
        self._fuse_weighting()

