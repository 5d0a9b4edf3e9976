"""``fusedjd.jac_to_grad``: torchjd's ``jac_to_grad`` without the concatenated Jacobian."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torchjd.aggregation import Aggregator, GramianWeightedAggregator
from torchjd.autojac import jac_to_grad as _torchjd_jac_to_grad
from torchjd.autojac._accumulation import _check_expects_grad, accumulate_grads, is_tensor_with_jac
from torchjd.autojac._jac_to_grad import _can_skip_jacobian_combination, _disunite_gradient, _free_jacs
from torchjd.autojac._utils import check_consistent_first_dimension

from ._distributed import ProcessGroup
from ._fused import _Fused, _hooked, gramian_weighted
from ._validation import check_floating

# The fused path of one aggregator: from the list of Jacobian blocks [m, n_b] to (the combined
# gradient [n], the weights jac_to_grad returns).
_Route = Callable[[list[Tensor]], tuple[Tensor, "Tensor | None"]]


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor | None:
    r"""
    Aggregates the Jacobians in the ``.jac`` fields of ``tensors`` and accumulates the result into
    their ``.grad`` fields: the signature, results, return value and errors of
    :func:`torchjd.autojac.jac_to_grad` (0.18), without its :math:`m \times n` concatenation of
    the Jacobians.

    The Gramian is computed over the list of ``.jac`` tensors in one call (each read where it
    lies), the aggregator's weighting runs on it, and one call combines the rows of every
    ``.jac`` into a single gradient vector whose pieces become (or are added to) the ``.grad``
    fields. Extra memory: :math:`O(k m^2 + n)`, against an extra :math:`m \times n` for torchjd's
    default path.

    Fused for :class:`~fusedjd.GradVac`, :class:`~fusedjd.PCGrad`,
    :class:`~fusedjd.GroupedGradVac` (its groups must be whole tensors, in the order of
    ``tensors``: :mod:`fusedjd.groups` makes them so), :class:`~fusedjd.MoCo` (its ``Y`` stays
    one flat ``[m, n]`` buffer) and any torchjd
    :class:`~torchjd.aggregation.GramianWeightedAggregator` (UPGrad, MGDA, DualProj, ...).
    Everything else goes to :func:`torchjd.autojac.jac_to_grad` unchanged: other aggregators,
    aggregators or weightings with forward hooks, and ``.jac`` tensors of mixed dtypes or
    devices.

    :param tensors: The tensors whose ``.jac`` fields are aggregated (all with the same first
        dimension ``m``).
    :param aggregator: The aggregator.
    :param retain_jac: Keep the ``.jac`` fields (deleted by default).
    :param optimize_gramian_computation: Accepted for torchjd compatibility; the fused path never
        concatenates. Passed on to torchjd when it takes the call.
    :param process_group: Sharded aggregation (``docs/CONTRACT.md`` §5): ``tensors`` are this
        rank's parameters (or shards), their ``.jac`` this rank's columns of the Jacobian; the
        Gramians are summed over the group (one all-reduce of ``k·m²`` numbers), every rank gets
        the same weights, and each writes its own part of the gradient. Defaults to the
        aggregator's own ``process_group`` (fusedjd's classes), else single-process. Only the
        fused path can shard: an aggregator torchjd would take is refused with a ``ValueError``.
    :returns: The weights (for weighted aggregators, as torchjd returns them), else ``None``.
    """
    tensors_ = []
    for t in tensors:
        if not is_tensor_with_jac(t):
            raise ValueError(
                "Some `jac` fields were not populated. Did you use `autojac.backward` or "
                "`autojac.mtl_backward` before calling `jac_to_grad`?",
            )
        tensors_.append(t)
    if len(tensors_) == 0:
        raise ValueError("The `tensors` parameter cannot be empty.")
    jacobians = [t.jac for t in tensors_]
    check_consistent_first_dimension(jacobians, "tensors.jac")

    group = process_group if process_group is not None else getattr(aggregator, "process_group", None)
    m = jacobians[0].shape[0]
    sizes = [j.numel() // m for j in jacobians] if m else []  # the tensors' column counts
    route = _route(aggregator, jacobians, sizes, group)
    if route is None and group is not None:
        raise ValueError(
            f"jac_to_grad with a process group needs an aggregator it can shard ({_SHARDABLE}), with "
            f"no forward hooks and .jac tensors of one dtype and device; got {aggregator!r}."
        )
    _check_before_changes(tensors_, jacobians, sizes, aggregator, retain_jac,
                          optimize_gramian_computation and route is None)
    if route is None:
        return _torchjd_jac_to_grad(tensors_, aggregator, retain_jac=retain_jac,
                                    optimize_gramian_computation=optimize_gramian_computation)
    blocks = [j.reshape(m, s) for j, s in zip(jacobians, sizes, strict=True)]  # views of contiguous .jac tensors
    del jacobians
    with torch.no_grad():  # fusedjd's aggregators are not differentiable: nothing here requires grad
        gradient, weights = route([b.detach() for b in blocks])
    del blocks
    if not retain_jac:  # (after the aggregation: a sharded step that the ranks refuse keeps .jac)
        _free_jacs(tensors_)
    _accumulate(tensors_, _disunite_gradient(gradient, tensors_))
    return weights


def _check_before_changes(tensors: list[Tensor], jacobians: list[Tensor], sizes: list[int], aggregator: Aggregator,
                          retain_jac: bool, optimize_for_torchjd: bool) -> None:
    """Raises, before any ``.jac`` is deleted, any aggregator state moves or any ``.grad`` is filled,
    the error that torchjd's ``jac_to_grad`` would raise only after some of that had happened (same
    type and message), for the fused path and for the calls handed to torchjd alike."""
    if not retain_jac and len({id(t) for t in tensors}) != len(tensors):
        raise AttributeError("'Tensor' object has no attribute 'jac'")  # torchjd deletes a listed-twice .jac twice
    if optimize_for_torchjd and not _can_skip_jacobian_combination(aggregator):
        raise ValueError(
            "In order to use `jac_to_grad` with `optimize_gramian_computation=True`, you must "
            "provide an `Aggregator` that computes weights based on the Gramian of the Jacobian"
            " (e.g. `UPGrad`) and that doesn't have any forward hooks attached to it."
        )
    for t in tensors:  # the checks accumulate_grads makes
        _check_expects_grad(t, field_name=".grad")
    if not sizes or torch.compiler.is_compiling():  # (a traced step cannot make a leaf that requires grad)
        return
    # the split and reshape of the gradient, and the assignment of each piece to .grad, rehearsed
    # on meta tensors (no memory, no compute) where they can fail: a .jac that does not fit its
    # tensor, or a grad_dtype that refuses the gradient (whose pieces have the tensor's dtype), fails
    # here as it would after the aggregation. (Only then: this runs at every training step.)
    fits = all(s == t.numel() for s, t in zip(sizes, tensors, strict=True))
    refusing = [t for t in tensors if t.grad is None and getattr(t, "grad_dtype", None) not in (None, t.dtype)]
    if fits and not refusing:
        return
    pieces = _disunite_gradient(torch.empty(sum(sizes), dtype=jacobians[0].dtype, device="meta"), tensors)
    for t, g in zip(tensors, pieces, strict=True):
        if any(t is r for r in refusing):
            probe = torch.empty(t.shape, dtype=t.dtype, device="meta", requires_grad=True)
            probe.grad_dtype = t.grad_dtype
            probe.grad = g


def _accumulate(tensors: list[Tensor], grads: list[Tensor]) -> None:
    """torchjd's accumulate_grads (``.grad += g``, or ``.grad = g``), the additions in one call
    (torchjd's own, one tensor after the other, when a tensor is listed twice)."""
    if len({id(t) for t in tensors}) != len(tensors):
        accumulate_grads(tensors, grads)
        return
    old = [(t.grad, g) for t, g in zip(tensors, grads, strict=True) if t.grad is not None]
    if old:
        torch._foreach_add_([a for a, _ in old], [g for _, g in old])
    for t, g in zip(tensors, grads, strict=True):
        if t.grad is None:
            t.grad = g


_SHARDABLE = "fusedjd's GradVac, PCGrad, GroupedGradVac, MoCo or a torchjd GramianWeightedAggregator"


def _route(aggregator: Aggregator, jacobians: list[Tensor], sizes: list[int],
           group: ProcessGroup | None) -> _Route | None:
    """The fused path for this aggregator and these Jacobians (``sizes``: their column counts),
    summing the Gramians over ``group`` when there is one, or None for torchjd's."""
    first = jacobians[0]
    if first.shape[0] == 0 or not first.is_floating_point() or any(
            j.dtype != first.dtype or j.device != first.device for j in jacobians):
        return None

    check_floating(first, "tensors.jac")  # a float8 .jac: refused by name before anything changes
    if isinstance(aggregator, _Fused):  # fusedjd's: its one route
        if aggregator._jac_to_grad_hooked():
            return None
        aggregator._check_tensor_columns(sizes)
        returns_weights = aggregator._returns_weights

        def fused(blocks: list[Tensor]) -> tuple[Tensor, Tensor | None]:
            return aggregator._fused(blocks, sizes, group)
    elif isinstance(aggregator, GramianWeightedAggregator):  # torchjd's: the route of fusedjd's UPGrad
        gw = aggregator.gramian_weighting
        if _hooked(aggregator, aggregator.weighting, gw):
            return None
        returns_weights = True

        def fused(blocks: list[Tensor]) -> tuple[Tensor, Tensor | None]:
            return gramian_weighted(blocks, sizes, group, gw, "a torchjd weighting")
    else:
        return None

    def route(blocks: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        out, W = fused(blocks)
        # the weights [m] in the dtype of the .jac tensors, as torchjd's (its Gramian has that dtype)
        return out, (W[0].to(first.dtype) if returns_weights else None)

    return route
