"""MoCo: the stateful aggregator of Fernando et al. (ICLR 2023), on a fused in-place step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchjd import Stateful
from torchjd.aggregation import Aggregator, Weighting

from . import _distributed, ops
from ._distributed import ProcessGroup
from ._fused import _Fused
from ._state import _BufferState, _NonDifferentiable
from ._validation import check_matrix, forwarded, in_unit_interval, non_negative

_SIMPLEX = ("softmax", "projection")


def _repr(obj: object, params: dict) -> str:
    return f"{type(obj).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


class _MoCoState(_BufferState):
    """Hyper-parameters, validated properties and the buffers ``Y``, ``λ`` and ``step``."""

    _state_names = ("_y", "_lam", "_step")

    def _configure(
        self, beta: float, beta_sigma: float, gamma: float, gamma_sigma: float, rho: float, simplex: str,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.process_group = process_group
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho
        self.simplex = simplex
        self._init_state()

    beta = in_unit_interval("beta")
    beta_sigma = non_negative("beta_sigma")
    gamma = non_negative("gamma")
    gamma_sigma = non_negative("gamma_sigma")
    rho = non_negative("rho")

    @property
    def simplex(self) -> str:
        return self._simplex

    @simplex.setter
    def simplex(self, value: str) -> None:
        if value not in _SIMPLEX:
            raise ValueError(f"Attribute `simplex` must be one of {_SIMPLEX}. Found simplex={value!r}.")
        self._simplex = value

    @property
    def y(self) -> Tensor:
        """The tracking matrix ``Y`` (the moving gradient estimate), shape ``[m, n]``."""
        if self._y.dim() != 2:
            raise RuntimeError(
                f"{self.__class__.__name__} has no moving gradient estimate yet: call it on a matrix first."
            )
        return self._y

    @property
    def step(self) -> Tensor:
        """The number of steps taken since the last reset, as a 0-dim int64 tensor on the state's
        device (read it with ``int(...)``, which syncs)."""
        if self._step.dim() != 0:
            return torch.zeros((), dtype=torch.long, device=self._step.device)
        return self._step

    def reset(self) -> None:
        """Clears ``Y``, ``λ`` and the step count: the next call starts from ``Y = 0``,
        uniform ``λ`` and step 0."""
        self._clear_state()

    def update(self, matrix: Tensor | Sequence[Tensor], group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
        """One MoCo step on ``matrix`` (the Jacobian ``[m, n]``, or a list of its column blocks
        ``[m, n_b]``, as :func:`fusedjd.jac_to_grad` passes it): updates ``Y``, ``λ`` and the step
        count in place and returns ``(λ, λᵀ Y)``; NaN for both, state untouched, if ``matrix`` is
        not finite.

        With a process group ``group``, ``matrix`` is this rank's columns and ``Y`` is sharded like
        it: the Gramian of the updated ``Y`` is summed over the ranks (one all-reduce of ``m²`` numbers) before the weight update, so ``λ`` and the step
        count stay identical on every rank, and a non-finite shard anywhere refuses the step
        everywhere. Without one, the step reads ``Y`` and ``J`` once for its Gramian."""
        if isinstance(matrix, Tensor):
            check_matrix(matrix)
            (m, n), first = matrix.shape, matrix
        elif len(matrix) == 1 and matrix[0].dim() == 2:  # the op checks the blocks' other properties
            first = matrix[0]
            m, n = first.shape
        else:  # refused with the op's message before the state is touched
            if not matrix:
                raise ValueError("fusedjd: `J` must hold at least one matrix, got an empty list")
            for b, block in enumerate(matrix):
                if block.dim() != 2:
                    raise RuntimeError(f"fusedjd: `J[{b}]` must have 2 dimensions, got shape {list(block.shape)}")
            first = matrix[0]
            m, n = first.shape[0], sum(b.shape[1] for b in matrix)
        if group is not None:  # before any change; the Gramian's dtype, as the other aggregators' checks take it
            _distributed.check_agreement(group, "MoCo", m, 1, ops.acc_dtype(first.dtype), first.device)
        state = self._buffers  # (direct: Module.__getattr__ costs about half a microsecond per buffer)
        Y = state["_y"]
        if Y.shape != (m, n) or Y.dtype != first.dtype or Y.device != first.device:
            self._y = Y = torch.zeros((m, n), dtype=first.dtype, device=first.device)
            self._lam = torch.full((m,), 1.0 / max(m, 1), dtype=ops.acc_dtype(first.dtype), device=first.device)
            self._step = torch.zeros((), dtype=torch.long, device=first.device)
        lam, step = state["_lam"], state["_step"]
        gram = None
        if group is not None:
            local = ops.moco_gramian(matrix, Y, step, self._beta, self._beta_sigma)
            gram = _distributed.all_reduce_sum(local, group)  # (agreement checked above)
        return ops.moco_step(
            matrix,
            Y,
            lam,
            step,
            self._beta,
            self._beta_sigma,
            self._gamma,
            self._gamma_sigma,
            self._rho,
            self._simplex == "projection",
            gram,
        )

    @property
    def hyper_parameters(self) -> dict[str, float | str]:
        """The hyper-parameters, by name, in constructor order."""
        names = ("beta", "beta_sigma", "gamma", "gamma_sigma", "rho", "simplex")
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        return _repr(self, self.hyper_parameters)


_MOCO_DOC = r"""
    MoCo from `Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
    Approach (ICLR 2023) <https://openreview.net/forum?id=dLAYGdKTi2>`_. Each call, with step
    :math:`k` (counted on the device):

    .. math::

        b_k = \beta / k^{\beta_\sigma},\quad c_k = \gamma / k^{\gamma_\sigma},\quad
        Y \leftarrow Y - b_k (Y - J),\quad
        \lambda \leftarrow S\!\left(\lambda - c_k (Y Y^\top + \rho I)\lambda\right)

    with :math:`S` the softmax (``simplex="softmax"``, as in LibMTL) or the Euclidean projection
    onto the probability simplex (``simplex="projection"``, as in the paper).

    The state (``Y``, the size of :math:`J`; :math:`\lambda`; the step count) lives in buffers and
    is updated in place by one fused op in two passes over :math:`J` and :math:`Y`: no
    :math:`m \times n` temporary. It resets when ``m``, ``n``, the dtype or the device changes. A
    non-finite :math:`J` returns NaN and leaves the state exactly as it was.

    :param beta: Rate of the tracking EMA, in [0, 1].
    :param beta_sigma: Decay exponent of the tracking rate.
    :param gamma: Step size of the weight update.
    :param gamma_sigma: Decay exponent of that step size.
    :param rho: Regularization added to the diagonal of :math:`Y Y^\top`.
    :param simplex: ``"softmax"`` or ``"projection"``.
    :param process_group: Sharded aggregation (``docs/CONTRACT.md`` §5): the matrix is this rank's
        columns of :math:`J`, ``Y`` is sharded like it, and only the :math:`m \times m` Gramian of
        the updated ``Y`` is summed over the group.
"""


class MoCoWeighting(Weighting, _MoCoState, Stateful, _NonDifferentiable):
    __doc__ = (
        r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting` taking the Jacobian
    matrix and returning the MoCo weights :math:`\lambda`. ``.y`` is the tracking matrix,
    ``.step`` the step count.
"""
        + _MOCO_DOC
    )

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        simplex: str = "softmax",
        *,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self._configure(beta, beta_sigma, gamma, gamma_sigma, rho, simplex, process_group)

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.update(matrix, self.process_group)[0]



class MoCo(_Fused, Aggregator, Stateful, _NonDifferentiable):
    __doc__ = (
        r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Aggregator` returning
    :math:`\lambda^\top Y` (the tracked gradients, not :math:`J`). Its state and
    hyper-parameters live in the :class:`~fusedjd.MoCoWeighting` submodule ``.weighting`` (as in
    torchjd's MoCo proposal); ``.beta``, ``.y``, ``.step``, ... read and write it. Through
    ``torchjd.autojac.jac_to_grad`` it returns ``None`` (torchjd's answer for aggregators that are
    not weighted combinations of the rows of :math:`J`).
"""
        + _MOCO_DOC
    )

    weighting: MoCoWeighting

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        simplex: str = "softmax",
        *,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.weighting = MoCoWeighting(beta, beta_sigma, gamma, gamma_sigma, rho, simplex,
                                       process_group=process_group)

    beta = forwarded("beta", to="weighting")
    beta_sigma = forwarded("beta_sigma", to="weighting")
    gamma = forwarded("gamma", to="weighting")
    gamma_sigma = forwarded("gamma_sigma", to="weighting")
    rho = forwarded("rho", to="weighting")
    simplex = forwarded("simplex", to="weighting")
    process_group = forwarded("process_group", to="weighting")

    @property
    def y(self) -> Tensor:
        """The tracking matrix ``Y`` of :attr:`weighting`."""
        return self.weighting.y

    @property
    def step(self) -> Tensor:
        """The step count of :attr:`weighting`."""
        return self.weighting.step

    def reset(self) -> None:
        """Clears ``Y``, ``λ`` and the step count."""
        self.weighting.reset()

    def _hook_modules(self) -> tuple[nn.Module, ...]:
        return (self._modules["weighting"],)

    def _hooked_forward(self, matrix: Tensor) -> Tensor:
        # through the module call, so its hooks run (as for torchjd's aggregators); λᵀ Y then costs
        # one more read of Y
        w = self._modules["weighting"]
        lam = w(matrix)
        return (lam.to(w.y.dtype) @ w.y) if matrix.shape[0] > 0 else matrix.new_zeros(matrix.shape[1])

    def _fused(self, blocks: list[Tensor], sizes: list[int], group: ProcessGroup | None) -> tuple[Tensor, None]:
        return self._modules["weighting"].update(blocks, group)[1], None

    def __repr__(self) -> str:
        return _repr(self, self.weighting.hyper_parameters)
