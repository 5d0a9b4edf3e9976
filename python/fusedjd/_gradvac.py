"""GradVac (and its weighting): a drop-in replacement for torchjd's, on fused kernels."""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.aggregation import GramianWeightedAggregator, Weighting

from . import _distributed, ops
from ._distributed import ProcessGroup
from ._fused import _GramianWeighted
from ._state import _BufferState, _NonDifferentiable
from ._validation import check_square, draws_mode, draws_repr, forwarded, in_unit_interval, non_negative


def _refuse_impossible_targets(state_dict: dict, prefix: str, error_msgs: list[str]) -> bool:
    """Targets are moving averages of cosines: finite, in [-1, 1]. Those of a checkpoint under
    ``prefix`` (fusedjd's ``_targets`` or torchjd's ``_phi_t``) a few ulps beyond ±1 (torchjd does
    not clamp its cosines) are clamped; others are refused by key (a NaN target would make GradVac
    a plain sum for good, a target of 5 blows its weights up): True, with the message in
    ``error_msgs``, and the caller loads nothing."""
    for key in (prefix + "_targets", prefix + "_phi_t"):
        T = state_dict.get(key)
        if not isinstance(T, Tensor) or T.numel() == 0 or not T.is_floating_point():
            continue
        slack = 1.0 + 8 * torch.finfo(T.dtype).eps
        finite = bool(torch.isfinite(T).all())  # sync-ok: loading a checkpoint
        if not finite or float(T.abs().max()) > slack:  # sync-ok: loading a checkpoint
            error_msgs.append(
                f"`{key}` must hold finite targets in [-1, 1]: found values in [{float(T.min())}, "  # sync-ok
                f"{float(T.max())}]{'' if finite else ', NaN or inf among them'}; nothing was loaded.")  # sync-ok
            return True
        state_dict[key] = T.clamp(-1.0, 1.0)
    return False


class GradVacWeighting(Weighting, Stateful, _BufferState, _NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting` giving the weights of
    :class:`~fusedjd.GradVac`, computed from the Gramian alone by a C++/CUDA kernel.

    Same arguments, state and results (under the same ``torch.manual_seed``) as
    :class:`torchjd.aggregation.GradVacWeighting`: the visit orders are drawn from the default
    CPU generator with the same draws ``torch.randperm`` makes for torchjd (then moved to the
    Gramian's device without a host sync), and the loop runs there in float64 arithmetic.

    The EMA targets :math:`\hat{\phi}` live in a registered buffer: they follow ``.to()``'s device
    (and keep their dtype), are saved by ``state_dict()``, and are reset when ``m``, the dtype or
    the device of the Gramian changes. A non-finite Gramian returns NaN weights and leaves the targets as they were.

    Guards (results are torchjd's everywhere else):

    - once a target has saturated at exactly :math:`\pm 1` in its dtype, the closed-form weight
      of the paper divides by ``eps`` alone and overflows; :math:`\sqrt{1-\hat{\phi}^2}` is
      floored at half the square root of the dtype's machine epsilon, a value no unsaturated
      target reaches;
    - the cosine is clamped to :math:`[-1, 1]` (rounding pushes it slightly out for collinear
      rows);
    - with ``eps = 0``, the cosine with a zero row (0/0) is taken as 0 instead of NaN;
    - rounding: a corrected row that has cancelled below what the Gramian's rounding resolves
      counts as zero (cosine 0, no correction), a correction applies only when the cosine is below
      the target by more than its own rounding, and the sine of a cosine within rounding of
      :math:`\pm 1` is 0 (``docs/CONTRACT.md`` §1, guard 4). On rank-deficient float32 Jacobians
      this removes the blow-ups (1e6 away from the float64 result); on the 96 tested rank-1 and
      rank-2 cases the float32 result is at median within 1e-6 of the float64 one, relative to the
      larger of the result and ``J`` (at most 1.6, where a cosine resolvable in float64 is not in
      float32).

    :param beta: EMA rate for :math:`\hat{\phi}`, in [0, 1].
    :param eps: Small non-negative constant added to denominators.
    :param process_group: With a ``torch.distributed`` group, the visit orders are drawn on its
        first rank and broadcast, so that every rank (given the same, already summed, Gramian)
        computes the same weights and targets.
    :param draws: ``"torchjd"`` (default): the visit orders are drawn on the host from the default
        CPU generator, exactly as torchjd draws them; a CUDA-graph capture of such a call is
        refused (a graph would replay the captured orders forever). ``"device"``: drawn on the
        Gramian's device from its generator (:func:`fusedjd.ops.draw_perms_device`), graph-safe
        and free of host work, but not torchjd's stream of draws.
    """

    _state_names = ("_targets",)
    # torchjd 0.18's GradVacWeighting keeps one [m, m] target matrix in `_phi_t`
    _foreign_state = {"_phi_t": ("_targets", lambda phi: phi.to(ops.acc_dtype(phi.dtype)).unsqueeze(0))}

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, *, process_group: ProcessGroup | None = None,
                 draws: str = "torchjd") -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps
        self.draws = draws
        self.process_group = process_group
        self._init_state()

    beta = in_unit_interval("beta")
    eps = non_negative("eps")
    draws = draws_mode()

    def reset(self) -> None:
        """Clears the EMA targets so the next call starts from zero targets."""
        self._clear_state()

    @property
    def _phi_t(self) -> Tensor | None:
        """torchjd's name for the targets ([m, m], None before the first call or after a reset): a
        read-only view, so that code written against torchjd's GradVacWeighting reads them."""
        T = self._buffers["_targets"]
        return None if T.dim() != 3 else T[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        if _refuse_impossible_targets(state_dict, prefix, error_msgs):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __repr__(self) -> str:  # torchjd's "GradVacWeighting()", with the draws when not torchjd's
        return f"{self.__class__.__name__}({draws_repr(self.draws)[2:]})"

    def forward(self, gramian: Tensor, /) -> Tensor:
        """The weights ``[m]`` of a Gramian ``[m, m]``, as torchjd's; or the weights ``[k, m]`` of a
        stack of group Gramians ``[k, m, m]``, each group with its own targets (what
        :class:`~fusedjd.GroupedGradVac` calls, so that hooks on its ``gramian_weighting`` see the
        groups' Gramians and weights)."""
        if gramian.dim() == 3:
            check_square(gramian[0] if gramian.shape[0] else gramian.new_empty(gramian.shape[1:]))
            return self.stacked(gramian, self.process_group)
        check_square(gramian)
        return self.stacked(gramian.unsqueeze(0), self.process_group)[0]

    def stacked(self, gramians: Tensor, group: ProcessGroup | None) -> Tensor:
        """Weights ``[k, m]`` for a stack of Gramians ``[k, m, m]`` (one per column group), each
        group with its own targets and visit orders, drawn group by group (on the first rank of
        ``group`` when there is one). Used by :class:`~fusedjd.GroupedGradVac`; the targets reset
        when ``k``, ``m``, the dtype or the device changes."""
        acc = ops.acc_dtype(gramians.dtype)
        G = gramians if gramians.dtype == acc else gramians.to(acc)
        k, m = G.shape[0], G.shape[1]
        T = self._targets_for(k, m, acc, G.device)
        perms = _distributed.draw_perms(k, m, False, G.device, group, self._draws)
        return ops.gradvac_loop(G, perms, T, self._beta, self._eps)

    def _targets_for(self, k: int, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The targets [k, m, m], reset to zeros when k, m, the dtype or the device changed."""
        T = self._buffers["_targets"]  # (direct: Module.__getattr__ costs a microsecond per call)
        if T.shape != (k, m, m) or T.dtype != dtype or T.device != device:
            T = self._targets = torch.zeros((k, m, m), dtype=dtype, device=device)
        return T

    def aggregate(self, J: list[Tensor], group_sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
        """Gramians, weights and combination of ``J`` (its column blocks) over its column groups:
        ``(combination [n], weights [k, m])``. On one process, one call (``ops.aggregate``); with
        ``group``, this rank's columns, the Gramians summed over the group."""
        if group is not None:
            return _distributed.sharded_aggregate(J, group_sizes, group, lambda G: self.stacked(G, group), "GradVac")
        first = J[0]
        k, m = len(group_sizes), first.shape[0]
        T = self._targets_for(k, m, ops.acc_dtype(first.dtype), first.device)
        perms = ops.draw_perms_device(k, m, first.device) if self._draws == "device" else None
        return ops.aggregate(J, group_sizes, T, self._beta, self._eps, False, perms)


class _GradVacSettings:
    """GradVac's settings and state, held by its ``gramian_weighting`` (a :class:`GradVacWeighting`):
    what :class:`GradVac` and :class:`~fusedjd.GroupedGradVac` both forward to it."""

    beta = forwarded("beta", to="gramian_weighting")
    eps = forwarded("eps", to="gramian_weighting")
    draws = forwarded("draws", to="gramian_weighting")
    process_group = forwarded("process_group", to="gramian_weighting")

    def reset(self) -> None:
        """Clears the EMA targets (of every group) so the next call starts from zero targets."""
        self.gramian_weighting.reset()


class GradVac(_GradVacSettings, _GramianWeighted, GramianWeightedAggregator, Stateful, _NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.GramianWeightedAggregator`
    implementing Gradient Vaccine (GradVac) from `Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models (ICLR 2021 Spotlight)
    <https://arxiv.org/abs/2010.05874>`_, as a drop-in replacement for
    :class:`torchjd.aggregation.GradVac`.

    The Gramian, the pairwise vaccine loop and the combination of the rows are fused C++/CUDA
    kernels; results equal torchjd's under the same ``torch.manual_seed``. Works with
    ``jac_to_grad`` (which returns the weights), including ``optimize_gramian_computation=True``.
    The state resets when ``m``, the dtype or the device changes (as torchjd's, not when ``n``
    does: a compiled GradVac takes a new ``n`` without recompiling). See
    :class:`~fusedjd.GradVacWeighting` for the guard against saturated targets.

    Checkpoints: ``load_state_dict`` also takes the ``state_dict`` of a
    :class:`torchjd.aggregation.GradVac` (0.18; its ``gramian_weighting._phi_t`` targets) and the
    run continues as torchjd's would. The other way round, torchjd 0.18 cannot load its own
    targets through ``load_state_dict`` (its buffer starts as ``None``); set them directly::

        targets = fused.state_dict()["gramian_weighting._targets"][0]
        tj.gramian_weighting._phi_t = targets.clone()
        tj.gramian_weighting._state_key = (targets.shape[0], targets.dtype)

    :param beta: EMA rate for :math:`\hat{\phi}`, in [0, 1].
    :param eps: Small non-negative constant added to denominators.
    :param process_group: Sharded aggregation (``docs/CONTRACT.md`` §5): the matrix is this rank's
        columns of the Jacobian, the Gramian is summed over the group, and the result is this
        rank's part of the aggregated gradient.
    :param draws: Where the visit orders are drawn: ``"torchjd"`` (default, torchjd's draws on the
        host; CUDA-graph capture refused) or ``"device"`` (graph-safe, another stream of draws);
        see :class:`~fusedjd.GradVacWeighting`.
    """

    gramian_weighting: GradVacWeighting

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, *, process_group: ProcessGroup | None = None,
                 draws: str = "torchjd") -> None:
        super().__init__(GradVacWeighting(beta=beta, eps=eps, process_group=process_group, draws=draws))
        self._fuse_weighting()


    _agreement = "GradVac"
    _broadcasts_weights = False

    def _fused(self, blocks: list[Tensor], sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
        # the Gramian, the loop and the combination in one call (ops.aggregate) on one process
        return self._modules["gramian_weighting"].aggregate(blocks, [sum(sizes)], group)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        if _refuse_impossible_targets(state_dict, prefix + "gramian_weighting.", error_msgs):
            return  # checked before anything loads: a refused checkpoint changes nothing
        # fusedjd 0.1's checkpoints also saved the number of columns, which the state no longer
        # depends on (torchjd's does not either)
        state_dict.pop(prefix + "_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(beta={self.beta!r}, eps={self.eps!r}{draws_repr(self.draws)})"
