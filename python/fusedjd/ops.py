"""Thin typed wrappers around the ``torch.ops.fusedjd`` operators: the only door to them.

Each function is one dispatcher call: the CPU or CUDA kernel is picked by the device of the
inputs. The ops a step calls (:func:`aggregate`, :func:`moco_step`, :func:`gramian`,
:func:`combine`) enter the dispatcher through ``fusedjd._C``'s typed bindings when torch.ops would
add nothing (eager, plain tensors, no torch-function mode): same op, same kernels, about 2 µs less
per call. The fake kernels (what ``torch.compile`` and ``torch.library.opcheck`` run instead) are in
:mod:`fusedjd._fake`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library and its registrations)
from . import _cpu  # noqa: F401  (loads the CPU kernels for this CPU)
from . import _fake  # noqa: F401  (registers the fake kernels)
from ._fake import acc_dtype

__all__ = [
    "acc_dtype",
    "aggregate",
    "combine",
    "draw_perms",
    "draw_perms_device",
    "dual_cone",
    "gradvac_loop",
    "gramian",
    "has_cuda_kernels",
    "mgda",
    "moco_gramian",
    "moco_step",
    "pcgrad_loop",
]


_is_compiling = torch.compiler.is_compiling
_torch_function_mode = torch._C._is_torch_function_mode_enabled


def _direct(tensors: Sequence[Tensor | None], *more: Tensor | None) -> bool:
    """Whether a call may go through ``fusedjd._C``'s typed entry point (the same op through the C++
    dispatcher, about 2 µs cheaper per call) rather than ``torch.ops``: eager, with no
    torch-function mode, on plain tensors (no ``__torch_function__`` for ``torch.ops`` to honour):
    every block of ``tensors``, and each of ``more`` that is given."""
    if _is_compiling() or _torch_function_mode():
        return False
    for t in tensors:
        if type(t) is not Tensor:
            return False
    for t in more:
        if t is not None and type(t) is not Tensor:
            return False
    return True


def _blocks(J: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(J, Tensor):
        return [J]
    blocks = list(J)
    if not blocks:  # the dispatcher cannot route a call without a tensor: say what is wrong here
        raise ValueError("fusedjd: `J` must hold at least one matrix, got an empty list")
    return blocks


def gramian(J: Tensor | Sequence[Tensor], group_sizes: Sequence[int]) -> Tensor:
    """Gramians of the column groups of ``J``.

    :param J: Matrix ``[m, n]`` (float16, bfloat16, float32 or float64), or a list of matrices
        ``[m, n_b]`` of one dtype and device, read as their concatenation along the columns
        (which is never formed).
    :param group_sizes: Sizes of the consecutive column groups; non-negative, summing to ``n``.
        A group may span several matrices of the list.
    :returns: ``[k, m, m]`` with ``G[g] = J_g J_gᵀ``, float32 (float64 for a float64 ``J``).
    """
    blocks, sizes = _blocks(J), list(group_sizes)
    if _direct(blocks):
        return _C.gramian(blocks, sizes)
    return torch.ops.fusedjd.gramian.default(blocks, sizes)


def gradvac_loop(G: Tensor, perms: Tensor, targets: Tensor, beta: float, eps: float) -> Tensor:
    """The GradVac loop on a stack of Gramians (``docs/CONTRACT.md`` §1; :func:`fusedjd.reference.gradvac_loop` is its executable form).

    :param G: Gramians ``[k, m, m]``, float32 or float64.
    :param perms: Visit orders ``[k, m, m-1]`` (int64): row ``i`` of group ``g`` visits the
        other rows in the order ``perms[g, i]``.
    :param targets: EMA targets ``[k, m, m]``, same dtype as ``G``; updated in place
        (left untouched when ``G`` is not finite).
    :returns: Weights ``[k, m]``: the column sums of the coefficient matrices. NaN when ``G``
        is not finite.
    """
    return torch.ops.fusedjd.gradvac_loop.default(G, perms, targets, float(beta), float(eps))


def pcgrad_loop(G: Tensor, perms: Tensor) -> Tensor:
    """The PCGrad loop on a stack of Gramians, with the same ``perms`` layout as :func:`gradvac_loop`."""
    return torch.ops.fusedjd.pcgrad_loop.default(G, perms)


def draw_perms(k: int, m: int, pcgrad: bool, device: torch.device | str | None = None) -> Tensor:
    """Visit orders ``[k, m, m-1]`` (int64) for :func:`gradvac_loop` / :func:`pcgrad_loop`, drawn
    from the default CPU generator exactly as torchjd draws them (group by group, row by row):

    - GradVac (``pcgrad=False``): ``torch.randperm(m - 1)`` per row, mapped onto the other rows;
    - PCGrad (``pcgrad=True``): ``torch.randperm(m)`` per row, with the row itself skipped.

    :param device: Where the result lives (CPU when ``None``). A CUDA result is copied from
        pinned memory without a host sync.
    """
    dev = None if device is None else torch.device(device)
    return torch.ops.fusedjd.draw_perms.default(int(k), int(m), bool(pcgrad), dev)


def combine(J: Tensor | Sequence[Tensor], weights: Tensor, group_sizes: Sequence[int]) -> Tensor:
    """Per-group combination of the rows of ``J``: ``out[cols of g] = weights[g] @ J_g``.

    :param J: Matrix ``[m, n]``, or a list of matrices ``[m, n_b]`` as in :func:`gramian`.
    :param weights: ``[k, m]``, one weight vector per column group.
    :returns: Vector ``[n]`` with the dtype of ``J``.
    """
    blocks, sizes = _blocks(J), list(group_sizes)
    if _direct(blocks, weights):
        return _C.combine(blocks, weights, sizes)
    return torch.ops.fusedjd.combine.default(blocks, weights, sizes)


def aggregate(
    J: Tensor | Sequence[Tensor],
    group_sizes: Sequence[int],
    targets: Tensor | None,
    beta: float,
    eps: float,
    pcgrad: bool,
    perms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GradVac (``pcgrad=False``, with ``targets``) or PCGrad (``pcgrad=True``, ``targets=None``)
    in one call: :func:`draw_perms`, :func:`gramian`, the loop and :func:`combine`, exactly as
    calling them in turn does (the same draws from the default generator).

    :param perms: Visit orders ``[k, m, m-1]`` drawn by the caller (e.g. :func:`draw_perms_device`),
        used instead of :func:`draw_perms`.
    :returns: ``(combination [n], weights [k, m])``.
    """
    blocks = _blocks(J)
    args = (blocks, list(group_sizes), targets, float(beta), float(eps), bool(pcgrad), perms)
    if _direct(blocks, targets, perms):
        return _C.aggregate(*args)
    return torch.ops.fusedjd.aggregate.default(*args)


def draw_perms_device(k: int, m: int, device: torch.device | str) -> Tensor:
    """Visit orders ``[k, m, m-1]`` (int64) drawn on ``device`` from its default generator: each
    row visits the other rows in a uniformly random order, as in torchjd, but from another stream
    of draws (``torch.rand`` and ``argsort``), so results differ from torchjd's under the same seed.
    Nothing touches the host: on CUDA it is graph-safe (each replay of a captured graph draws new
    orders, as PyTorch's random ops do). What the classes' ``draws="device"`` calls; GradVac and
    PCGrad take the same orders."""
    if m <= 1:
        return torch.empty((k, m, 0), dtype=torch.long, device=device)
    order = torch.rand((k, m, m - 1), dtype=torch.float64, device=device).argsort(dim=-1)
    return order + (order >= torch.arange(m, device=device).view(1, m, 1))


def moco_step(
    J: Tensor | Sequence[Tensor],
    Y: Tensor,
    lam: Tensor,
    step: Tensor,
    beta: float,
    beta_sigma: float,
    gamma: float,
    gamma_sigma: float,
    rho: float,
    projection: bool,
    gram: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One MoCo step (``docs/CONTRACT.md`` §2; :func:`fusedjd.reference.moco_step`), updating ``Y``, ``lam`` and ``step`` in place.

    :param J: Jacobian ``[m, n]``, or a list of matrices ``[m, n_b]`` as in :func:`gramian`.
    :param Y: Tracking matrix ``[m, n]`` (contiguous, dtype of ``J``).
    :param lam: Weights ``[m]``, float32 (float64 for a float64 ``J``).
    :param step: 0-dim int64 step counter (incremented on the device).
    :param projection: ``True`` for the Euclidean simplex projection, ``False`` for softmax.
    :param gram: The Gramian ``[m, m]`` of the updated ``Y`` (float32; float64 for float64), when
        the caller has it: sharded MoCo passes the sum over the ranks of :func:`moco_gramian`.
        Without it the step computes it in its first pass.
    :returns: ``(weights, lamᵀ Y)``; both NaN, with the state untouched, when ``J`` (or ``gram``)
        is not finite. A given ``gram`` is trusted: ``J``'s finiteness then shows only through it.
    """
    blocks = _blocks(J)
    args = (blocks, Y, lam, step, float(beta), float(beta_sigma), float(gamma), float(gamma_sigma), float(rho),
            bool(projection), gram)
    if _direct(blocks, Y, lam, step, gram):
        return _C.moco_step(*args)
    return torch.ops.fusedjd.moco_step.default(*args)


def moco_gramian(J: Tensor | Sequence[Tensor], Y: Tensor, step: Tensor, beta: float, beta_sigma: float) -> Tensor:
    """MoCo's first pass alone: the Gramian ``[m, m]`` of the ``Y`` the next :func:`moco_step` would
    store, ``Y + b (J - Y)`` with ``b = beta / (step + 1)^beta_sigma`` (read on the device), rounded
    to ``Y``'s dtype as the step stores it. Nothing is written."""
    return torch.ops.fusedjd.moco_gramian.default(_blocks(J), Y, step, float(beta), float(beta_sigma))


def dual_cone(U: Tensor, G: Tensor) -> Tensor:
    """For each ``u`` in ``U`` (``[..., m]``), the ``v >= u`` minimising ``vᵀ G v``: the weights of the
    projection of ``Jᵀu`` onto the dual cone of ``J``'s rows, given ``G = J Jᵀ`` (the problem of
    :class:`torchjd.linalg.DualConeProjector`, Proposition 1 of arXiv 2406.16232).

    Solved exactly (the KKT point) in float64 by block principal pivoting, with an active-set method
    as its fallback (``docs/CONTRACT.md`` §2b), every right-hand side on the CPU's threads or in one
    CUDA launch, without host synchronisation.
    ``G`` must be symmetric positive definite for the solution to be exact (:class:`fusedjd.Projector`
    adds ``reg_eps · I``); a non-finite ``G`` or ``u`` gives NaN.

    :param U: ``[..., m]``, float16, bfloat16, float32 or float64.
    :param G: ``[m, m]``, same device.
    :returns: ``V`` with the shape of ``U`` and the dtype of ``G``.
    """
    return torch.ops.fusedjd.dual_cone.default(U, G)


def mgda(G: Tensor, epsilon: float = 0.001, max_iters: int = 100) -> Tensor:
    """MGDA's weights (:class:`torchjd.aggregation.MGDAWeighting`) from the Gramian: torchjd's
    Frank–Wolfe iteration (Algorithm 2 of Sener and Koltun, 2018) with its ``epsilon``, ``max_iters``
    and branch rules, in float64, the loop and its stopping test on the device (one CUDA launch, no
    host synchronisation). A non-finite ``G`` gives NaN.

    :param G: ``[m, m]``, float16, bfloat16, float32 or float64.
    :param epsilon: The step size below which the iteration stops (> 0).
    :param max_iters: The most iterations (> 0).
    :returns: The weights ``[m]`` in ``G``'s dtype.
    """
    return torch.ops.fusedjd.mgda.default(G, float(epsilon), max_iters)


def has_cuda_kernels() -> bool:
    """Whether this build of fusedjd registered CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedjd::gramian", "CUDA")
