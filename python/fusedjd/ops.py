"""Thin typed wrappers around the ``torch.ops.fusedjd`` operators, with their fake kernels.

Each function is one dispatcher call: the CPU or CUDA kernel is picked by the
device of the inputs. The fake kernels (``torch.library.register_fake``) give
``torch.compile`` and ``torch.library.opcheck`` the output shapes without
running anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library and its registrations)

__all__ = ["gramian", "gradvac_loop", "pcgrad_loop", "combine", "moco_step", "has_cuda_kernels"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype (the kernels' accumulation
    and state dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gramian(J: Tensor, group_sizes: Sequence[int]) -> Tensor:
    """Gramians of the column groups of ``J``.

    :param J: Matrix ``[m, n]`` (float16, bfloat16, float32 or float64).
    :param group_sizes: Sizes of the consecutive column groups; non-negative, summing to ``n``.
    :returns: ``[k, m, m]`` with ``G[g] = J_g J_gᵀ``, float32 (float64 for a float64 ``J``).
    """
    return torch.ops.fusedjd.gramian.default(J, list(group_sizes))


def gradvac_loop(G: Tensor, perms: Tensor, targets: Tensor, beta: float, eps: float) -> Tensor:
    """The GradVac loop on a stack of Gramians (see SPEC §1).

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


def combine(J: Tensor, weights: Tensor, group_sizes: Sequence[int]) -> Tensor:
    """Per-group combination of the rows of ``J``: ``out[cols of g] = weights[g] @ J_g``.

    :param J: Matrix ``[m, n]``.
    :param weights: ``[k, m]``, one weight vector per column group.
    :returns: Vector ``[n]`` with the dtype of ``J``.
    """
    return torch.ops.fusedjd.combine.default(J, weights, list(group_sizes))


def moco_step(
    J: Tensor,
    Y: Tensor,
    lam: Tensor,
    step: Tensor,
    beta: float,
    beta_sigma: float,
    gamma: float,
    gamma_sigma: float,
    rho: float,
    projection: bool,
) -> tuple[Tensor, Tensor]:
    """One MoCo step (see SPEC §2), updating ``Y``, ``lam`` and ``step`` in place.

    :param J: Jacobian ``[m, n]``.
    :param Y: Tracking matrix ``[m, n]`` (contiguous, dtype of ``J``).
    :param lam: Weights ``[m]``, float32 (float64 for a float64 ``J``).
    :param step: 0-dim int64 step counter (incremented on the device).
    :param projection: ``True`` for the Euclidean simplex projection, ``False`` for softmax.
    :returns: ``(weights, lamᵀ Y)``; both NaN, with the state untouched, when ``J`` is not finite.
    """
    return torch.ops.fusedjd.moco_step.default(
        J, Y, lam, step, float(beta), float(beta_sigma), float(gamma), float(gamma_sigma), float(rho), bool(projection)
    )


def has_cuda_kernels() -> bool:
    """Whether this build of fusedjd registered CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedjd::gramian", "CUDA")


@torch.library.register_fake("fusedjd::gramian")
def _(J, group_sizes):
    torch._check(J.dim() == 2, lambda: f"fusedjd: `J` must have 2 dimensions, got shape {tuple(J.shape)}")
    return J.new_empty((len(group_sizes), J.shape[0], J.shape[0]), dtype=_acc_dtype(J.dtype))


@torch.library.register_fake("fusedjd::gradvac_loop")
def _(G, perms, targets, beta, eps):
    return G.new_empty((G.shape[0], G.shape[1]))


@torch.library.register_fake("fusedjd::pcgrad_loop")
def _(G, perms):
    return G.new_empty((G.shape[0], G.shape[1]))


@torch.library.register_fake("fusedjd::draw_perms")
def _(k, m, pcgrad):
    return torch.empty((k, m, max(m - 1, 0)), dtype=torch.long)


@torch.library.register_fake("fusedjd::combine")
def _(J, weights, group_sizes):
    return J.new_empty((J.shape[1],))


@torch.library.register_fake("fusedjd::moco_step")
def _(J, Y, lam, step, beta, beta_sigma, gamma, gamma_sigma, rho, projection):
    return lam.new_empty((J.shape[0],)), J.new_empty((J.shape[1],))
