"""MGDA (and its weighting): torchjd's classes on the fused route, the Frank–Wolfe loop in one kernel."""

from __future__ import annotations

from torch import Tensor
from torchjd import aggregation as ta
from torchjd.aggregation import GramianWeightedAggregator

from . import ops
from ._distributed import ProcessGroup
from ._fused import _GramianWeighted
from ._state import _NonDifferentiable
from ._validation import check_square, positive, positive_int


class MGDAWeighting(ta.MGDAWeighting, _NonDifferentiable):
    r"""
    :class:`torchjd.aggregation.MGDAWeighting` computed by a C++/CUDA kernel (:func:`fusedjd.ops.mgda`):
    torchjd's Frank–Wolfe iteration (Algorithm 2 of Sener and Koltun, 2018) with the same
    ``epsilon``, ``max_iters``, first index on ties of the argmin and branch rules, in float64 (torchjd
    iterates in the Gramian's dtype), the loop and its stopping test on the Gramian's device: no
    Python loop, no host synchronisation (torchjd's branches read tensor values on the host at every
    iteration), so a step with MGDA can be captured in a CUDA graph. A non-finite Gramian gives NaN
    weights. The weights do not require grad.

    :param epsilon: The value of :math:`\hat{\gamma}` below which the iteration stops (> 0).
    :param max_iters: The maximum number of iterations (a positive integer).
    """

    epsilon = positive("epsilon")
    max_iters = positive_int("max_iters")

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_square(gramian)
        return ops.mgda(gramian, float(self.epsilon), self.max_iters)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(epsilon={self.epsilon!r}, max_iters={self.max_iters!r})"


class MGDA(_GramianWeighted, ta.MGDA):
    r"""
    :class:`torchjd.aggregation.MGDA` on the fused route: the fused Gramian, :class:`MGDAWeighting`'s
    kernel, the fused combination; the same route serves ``forward``, :func:`fusedjd.jac_to_grad` and
    sharded aggregation.

    :param epsilon: The value of :math:`\hat{\gamma}` below which the iteration stops (> 0).
    :param max_iters: The maximum number of iterations (a positive integer).
    :param process_group: Sharded aggregation, as for :class:`~fusedjd.GradVac` (the first rank's
        weights count).
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100, *,
                 process_group: ProcessGroup | None = None) -> None:
        GramianWeightedAggregator.__init__(self, MGDAWeighting(epsilon=epsilon, max_iters=max_iters))
        self.process_group = process_group
        self._fuse_weighting()
