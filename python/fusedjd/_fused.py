"""The one route every fusedjd aggregator takes, from the Jacobian to the kernels.

An aggregator implements :meth:`_Fused._fused`: its whole aggregation of a Jacobian given as a
list of column blocks (one matrix, or the ``.jac`` tensors of :func:`fusedjd.jac_to_grad`), with
the process group already resolved. ``forward`` (written here, once) and ``jac_to_grad`` both call
it; the sharded path is the same call with a group. Only when hooks are registered on the
aggregator's submodules does ``forward`` go through them instead (``_hooked_forward``), as torchjd's
aggregators do, so that the hooks run.

Every Gramian-weighted aggregator (UPGrad, DualProj, GradVac, PCGrad) derives from
:class:`_GramianWeighted`, whose route is :func:`gramian_weighted`: the fused Gramian, the
weighting, the fused combination (GradVac and PCGrad run the three in one kernel call).
``jac_to_grad`` takes the same function for torchjd's own Gramian-weighted aggregators.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import _distributed, ops
from ._distributed import ProcessGroup, all_reduce_sum, from_first_rank
from ._validation import check_matrix


class _Fused(nn.Module):
    """Base of fusedjd's aggregators (placed before torchjd's base, whose ``forward`` it replaces)."""

    def __call__(self, *args, **kwargs):
        """``forward`` straight away when nothing else would run around it: one matrix that does not
        require grad, no hook on this module or global one, not compiled, traced or compiling.
        Otherwise (and for anything else) the full call of torchjd's base and ``nn.Module``, under
        ``torch.no_grad``. Both give the same result: the kernels record no graph, so ``no_grad``
        matters only for a matrix that requires grad; what the full call adds costs a few
        microseconds, as much as a whole aggregation of a small matrix."""
        if len(args) == 1 and not kwargs:
            matrix = args[0]
            if (type(matrix) is Tensor and not matrix.requires_grad and not self._forward_hooks
                    and not self._forward_pre_hooks and not self._backward_hooks and not self._backward_pre_hooks
                    and self._compiled_call_impl is None and not _module._global_forward_hooks
                    and not _module._global_forward_pre_hooks and not _module._global_backward_hooks
                    and not _module._global_backward_pre_hooks and not _tracing_state()
                    and not _is_compiling()):
                return self.forward(matrix)
        return super().__call__(*args, **kwargs)

    def forward(self, matrix: Tensor, /) -> Tensor:
        check_matrix(matrix)
        self._check_matrix_columns(matrix)
        if self._submodules_hooked():
            return self._hooked_forward(matrix)
        return self._fused([matrix], [matrix.shape[1]], self.process_group)[0]

    # whether jac_to_grad returns the weights ([m]: GradVac, PCGrad) or None (torchjd's answer for
    # aggregators that are not one weighting of the rows: GroupedGradVac, MoCo)
    _returns_weights = False

    def _fused(self, blocks: list[Tensor], sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, Tensor | None]:
        """The aggregation of the matrix ``[blocks[0] blocks[1] ...]`` (``sizes``: the blocks' column
        counts), its Gramians summed over ``group`` when there is one: ``(the combination [n], the
        weights [k, m] or None)``."""
        raise NotImplementedError

    def _hooked_forward(self, matrix: Tensor) -> Tensor:
        """``forward`` through the submodules' calls, so that their hooks run."""
        raise NotImplementedError

    def _hook_modules(self) -> tuple[nn.Module, ...]:
        """The submodules whose hooks the aggregation must run."""
        return ()

    def _check_matrix_columns(self, matrix: Tensor) -> None:
        """Checks of ``forward``'s matrix beyond its rank and dtype (GroupedGradVac: its groups)."""

    def _check_tensor_columns(self, sizes: list[int]) -> None:
        """Checks of jac_to_grad's column counts (GroupedGradVac: its groups are whole tensors)."""

    def _submodules_hooked(self) -> bool:
        return _hooked(*self._hook_modules())

    def _jac_to_grad_hooked(self) -> bool:
        """Whether jac_to_grad, which calls no module, would skip hooks: they go to torchjd's."""
        return _hooked(self, *self._hook_modules())


_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling


def _hooked(*modules: nn.Module) -> bool:
    """Whether calling these modules would run hooks (theirs or global ones). (A loop, not any():
    this runs on every call.)"""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    for mod in modules:
        if mod._forward_hooks or mod._forward_pre_hooks:
            return True
    return False


class _FusedGramian:
    """The Gramian of a whole matrix through the fused op, summed over the aggregator's process
    group when it has one: what a Gramian-weighted aggregator's ``weighting`` composes its
    ``gramian_weighting`` with (torchjd composes it with ``J @ J.T``), so that a hooked forward
    runs the hooks on the fused Gramian."""

    def __init__(self, aggregator: _GramianWeighted) -> None:
        self.aggregator = aggregator  # (read at each call: its process group may change)

    def __call__(self, matrix: Tensor) -> Tensor:
        check_matrix(matrix)
        agg = self.aggregator
        return all_reduce_sum(ops.gramian(matrix, [matrix.shape[1]]), agg.process_group, agg._agreement)[0]


def gramian_weighted(blocks: list[Tensor], sizes: list[int], group: ProcessGroup | None,
                     gramian_weighting: nn.Module, agreement: str) -> tuple[Tensor, Tensor]:
    """The route of a Gramian-weighted aggregator: the fused Gramian of ``[blocks[0] blocks[1]
    ...]`` (summed over ``group``, the ranks' agreement checked first under the name
    ``agreement``), ``gramian_weighting`` on it (every rank runs it; the first rank's weights
    count), the fused combination: ``(combination [n], weights [1, m])``. fusedjd's UPGrad and
    DualProj take it, and so does :func:`fusedjd.jac_to_grad` for torchjd's Gramian-weighted
    aggregators."""

    def weigh(G: Tensor) -> Tensor:
        return from_first_rank(gramian_weighting(G[0]), group).unsqueeze(0)

    return _distributed.sharded_aggregate(blocks, [sum(sizes)], group, weigh, agreement)


class _GramianWeighted(_Fused):
    """Base of fusedjd's Gramian-weighted aggregators (placed before torchjd's
    ``GramianWeightedAggregator``): the fused Gramian of the whole matrix, the weighting, the
    fused combination (:func:`gramian_weighted`). ``jac_to_grad`` returns its weights. A class with
    a one-call kernel for the three (GradVac, PCGrad) overrides ``_fused``.

    Its ``weighting`` is ``gramian_weighting`` composed with the fused Gramian
    (:class:`_FusedGramian`), which a forward with hooks on either goes through."""

    _returns_weights = True
    _agreement = "a torchjd weighting"  # the name the ranks of a group check they agree on
    process_group: ProcessGroup | None = None

    def _fuse_weighting(self) -> None:
        """``weighting``: ``gramian_weighting`` on the fused Gramian (called by ``__init__``)."""
        self.weighting = self.gramian_weighting << _FusedGramian(self)

    def _hook_modules(self) -> tuple[nn.Module, ...]:
        return self._modules["weighting"], self._modules["gramian_weighting"]

    # whether the route sends the first rank's weights to the others (gramian_weighted does; GradVac
    # and PCGrad instead draw their visit orders on the first rank, so every rank computes the same)
    _broadcasts_weights = True

    def _hooked_forward(self, matrix: Tensor) -> Tensor:
        weights = self._modules["weighting"](matrix)
        if self._broadcasts_weights:  # the same collectives as the unhooked route, the same weights
            weights = from_first_rank(weights, self.process_group)
        return ops.combine(matrix, weights.unsqueeze(0), [matrix.shape[1]])

    def _fused(self, blocks: list[Tensor], sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
        return gramian_weighted(blocks, sizes, group, self._modules["gramian_weighting"], self._agreement)
