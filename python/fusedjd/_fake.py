"""The fake kernels of the fusedjd ops (``torch.library.register_fake``): output shapes for
``torch.compile`` and ``torch.library.opcheck`` without running anything.

They check what can be checked without data (ranks, shapes, dtypes, devices) with the messages of
the C++ checks in csrc/common.h, so a traced or compiled call fails at trace time as the eager
call does (tests/test_ops.py compares the two messages for every check). Imported by
:mod:`fusedjd.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation and state dtype for inputs of ``dtype``: float64 for float64,
    float32 for every other floating dtype (``fusedjd.ops.acc_dtype``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_SCALAR_NAME = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.uint16: "UInt16", torch.uint32: "UInt32", torch.uint64: "UInt64",
    torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2", torch.float8_e4m3fnuz: "Float8_e4m3fnuz",
    torch.float8_e5m2fnuz: "Float8_e5m2fnuz",
}


def _st(dtype: torch.dtype) -> str:
    return _SCALAR_NAME.get(dtype, str(dtype))


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_dim(t: Tensor, name: str, d: int) -> None:
    torch._check(t.dim() == d, lambda: f"fusedjd: `{name}` must have {d} dimensions, got shape {_shape(t)}")


def _check_float(t: Tensor, name: str) -> None:
    torch._check(t.is_floating_point(),
                 lambda: f"fusedjd: `{name}` must be a floating-point tensor, got dtype {_st(t.dtype)}")


def _check_same_device(x: Tensor, xn: str, y: Tensor, yn: str) -> None:
    torch._check(x.device == y.device, lambda: f"fusedjd: `{xn}` is on {x.device} but `{yn}` is on {y.device}; "
                 "all tensors must be on the same device")


def _check_dtype(t: Tensor, name: str, dtype: torch.dtype) -> None:
    torch._check(t.dtype == dtype, lambda: f"fusedjd: `{name}` must have dtype {_st(dtype)}, got {_st(t.dtype)}")


def _check_contiguous(t: Tensor, name: str) -> None:
    torch._check(t.is_contiguous(), lambda: f"fusedjd: `{name}` must be contiguous, got strides "
                 f"{list(t.stride())} for shape {_shape(t)}")


def _check_group_sizes(group_sizes: Sequence[int], n) -> None:
    torch._check(len(group_sizes) > 0, lambda: "fusedjd: `group_sizes` must name at least one group, got []")
    total = 0
    for g, s in enumerate(group_sizes):  # in the kernels' order: each size, then the running sum
        torch._check(s >= 0, lambda: f"fusedjd: `group_sizes` must be non-negative, got {s} at position {g}")
        total += s
        torch._check(total < 2**63, lambda: f"fusedjd: `group_sizes` must sum to the number of columns n={n}, got "
                     f"a sum beyond the int64 range for {len(group_sizes)} groups")
    torch._check(total == n, lambda: f"fusedjd: `group_sizes` must sum to the number of columns n={n}, got sum "
                 f"{total} for {len(group_sizes)} groups")


def _check_loop(G: Tensor, perms: Tensor) -> None:
    _check_dim(G, "G", 3)
    torch._check(G.shape[1] == G.shape[2],
                 lambda: f"fusedjd: `G` must be a stack of square Gramians [k, m, m], got shape {_shape(G)}")
    torch._check(G.dtype in (torch.float32, torch.float64),
                 lambda: f"fusedjd: `G` must be float32 or float64, got {_st(G.dtype)}")
    _check_dim(perms, "perms", 3)
    _check_dtype(perms, "perms", torch.long)
    _check_same_device(G, "G", perms, "perms")
    k, m = G.shape[0], G.shape[1]
    m1 = max(m - 1, 0)
    torch._check(tuple(perms.shape) == (k, m, m1),
                 lambda: f"fusedjd: `perms` must have shape [k, m, m-1] = [{k}, {m}, {m1}], got {_shape(perms)}")


def _check_blocks(J: Sequence[Tensor]) -> tuple[int, int]:
    """common.h's check_blocks: returns (m, n)."""
    torch._check(len(J) > 0, lambda: "fusedjd: `J` must hold at least one matrix, got an empty list")
    J0 = J[0]
    m = J0.shape[0] if J0.dim() == 2 else 0
    n = 0
    for b, x in enumerate(J):
        _check_dim(x, f"J[{b}]", 2)
        _check_float(x, f"J[{b}]")
        torch._check(x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                     lambda: f"fusedjd: `J[{b}]` must be float16, bfloat16, float32 or float64, got {_st(x.dtype)}")
        torch._check(x.dtype == J0.dtype, lambda: f"fusedjd: `J[{b}]` must have the dtype of `J[0]` "
                     f"({_st(J0.dtype)}), got {_st(x.dtype)}")
        _check_same_device(x, f"J[{b}]", J0, "J[0]")
        torch._check(x.shape[0] == m, lambda: f"fusedjd: `J[{b}]` must have m={m} rows like `J[0]`, got shape "
                     f"{_shape(x)}")
        n = n + x.shape[1]
    return m, n


@torch.library.register_fake("fusedjd::gramian")
def _(J, group_sizes):
    m, n = _check_blocks(J)
    _check_group_sizes(group_sizes, n)
    return J[0].new_empty((len(group_sizes), m, m), dtype=acc_dtype(J[0].dtype))


@torch.library.register_fake("fusedjd::gradvac_loop")
def _(G, perms, targets, beta, eps):
    # in the order of the kernels: targets, hyper-parameters, then G and perms
    _check_same_device(G, "G", targets, "targets")
    torch._check(targets.shape == G.shape,
                 lambda: f"fusedjd: `targets` must have the shape of `G` {_shape(G)}, got {_shape(targets)}")
    torch._check(targets.dtype == G.dtype, lambda: f"fusedjd: `targets` must have the dtype of `G` "
                 f"({_st(G.dtype)}), got {_st(targets.dtype)}")
    _check_contiguous(targets, "targets")
    torch._check(0.0 <= beta <= 1.0, lambda: f"fusedjd: `beta` must be in [0, 1], got {beta:g}")
    torch._check(eps >= 0.0, lambda: f"fusedjd: `eps` must be non-negative, got {eps:g}")
    _check_loop(G, perms)
    return G.new_empty((G.shape[0], G.shape[1]))


@torch.library.register_fake("fusedjd::pcgrad_loop")
def _(G, perms):
    _check_loop(G, perms)
    return G.new_empty((G.shape[0], G.shape[1]))


@torch.library.register_fake("fusedjd::draw_perms")
def _(k, m, pcgrad, device=None):
    torch._check(k >= 0 and m >= 0, lambda: f"fusedjd: draw_perms needs k >= 0 and m >= 0, got k={k}, m={m}")
    return torch.empty((k, m, max(m - 1, 0)), dtype=torch.long, device=device)


_DUAL_CONE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.library.register_fake("fusedjd::dual_cone")
def _(U, G):
    torch._check(G.dim() == 2 and G.shape[0] == G.shape[1],
                 lambda: f"fusedjd: `G` must be a square Gramian [m, m], got shape {_shape(G)}")
    torch._check(G.dtype in _DUAL_CONE_DTYPES,
                 lambda: f"fusedjd: `G` must be float16, bfloat16, float32 or float64, got {_st(G.dtype)}")
    torch._check(U.dim() >= 1 and U.shape[-1] == G.shape[0],
                 lambda: f"fusedjd: `U` must have shape [..., m] with m = {G.shape[0]} (the size of `G`), "
                 f"got shape {_shape(U)}")
    torch._check(U.dtype in _DUAL_CONE_DTYPES,
                 lambda: f"fusedjd: `U` must be float16, bfloat16, float32 or float64, got {_st(U.dtype)}")
    _check_same_device(U, "U", G, "G")
    return U.new_empty(U.shape, dtype=G.dtype)


@torch.library.register_fake("fusedjd::mgda")
def _(G, epsilon, max_iters):
    torch._check(G.dim() == 2 and G.shape[0] == G.shape[1],
                 lambda: f"fusedjd: `G` must be a square Gramian [m, m], got shape {_shape(G)}")
    torch._check(G.dtype in _DUAL_CONE_DTYPES,
                 lambda: f"fusedjd: `G` must be float16, bfloat16, float32 or float64, got {_st(G.dtype)}")
    torch._check(epsilon > 0.0, lambda: f"fusedjd: `epsilon` must be positive, got {epsilon:g}")
    torch._check(max_iters > 0, lambda: f"fusedjd: `max_iters` must be a positive integer, got {max_iters}")
    return G.new_empty((G.shape[0],))


@torch.library.register_fake("fusedjd::combine")
def _(J, weights, group_sizes):
    m, n = _check_blocks(J)
    _check_dim(weights, "weights", 2)
    _check_float(weights, "weights")
    _check_same_device(weights, "weights", J[0], "J")
    _check_group_sizes(group_sizes, n)
    k = len(group_sizes)
    torch._check(tuple(weights.shape) == (k, m),
                 lambda: f"fusedjd: `weights` must have shape [k, m] = [{k}, {m}], got {_shape(weights)}")
    return J[0].new_empty((n,))


def _check_moco_state(J, Y, step) -> tuple[int, int]:
    m, n = _check_blocks(J)
    _check_same_device(Y, "Y", J[0], "J")
    torch._check(Y.dim() == 2 and tuple(Y.shape) == (m, n),
                 lambda: f"fusedjd: `Y` must have shape [m, n] = [{m}, {n}], got {_shape(Y)}")
    torch._check(Y.dtype == J[0].dtype,
                 lambda: f"fusedjd: `Y` must have the dtype of `J` ({_st(J[0].dtype)}), got {_st(Y.dtype)}")
    _check_contiguous(Y, "Y")
    _check_same_device(step, "step", J[0], "J")
    _check_dim(step, "step", 0)
    _check_dtype(step, "step", torch.long)
    return m, n


@torch.library.register_fake("fusedjd::moco_step")
def _(J, Y, lam, step, beta, beta_sigma, gamma, gamma_sigma, rho, projection, gram=None):
    m, n = _check_moco_state(J, Y, step)
    _check_same_device(lam, "lam", J[0], "J")
    _check_dim(lam, "lam", 1)
    torch._check(lam.shape[0] == m, lambda: f"fusedjd: `lam` must have length m={m}, got {lam.shape[0]}")
    _check_dtype(lam, "lam", acc_dtype(J[0].dtype))
    _check_contiguous(lam, "lam")
    if gram is not None:
        _check_same_device(gram, "gram", J[0], "J")
        torch._check(gram.dim() == 2 and tuple(gram.shape) == (m, m),
                     lambda: f"fusedjd: `gram` must have shape [m, m] = [{m}, {m}], got {_shape(gram)}")
        _check_dtype(gram, "gram", acc_dtype(J[0].dtype))
        _check_contiguous(gram, "gram")
    return lam.new_empty((m,)), Y.new_empty((n,))


@torch.library.register_fake("fusedjd::aggregate")
def _(J, group_sizes, targets, beta, eps, pcgrad, perms=None):
    torch._check(pcgrad or targets is not None,
                 lambda: "fusedjd: `targets` is required for GradVac (pcgrad=False), got None")
    m, n = _check_blocks(J)
    _check_group_sizes(group_sizes, n)
    k = len(group_sizes)
    G = J[0].new_empty((k, m, m), dtype=acc_dtype(J[0].dtype))
    if perms is None:
        perms = torch.empty((k, m, max(m - 1, 0)), dtype=torch.long, device=J[0].device)
    if pcgrad:
        _check_loop(G, perms)
    else:  # the loop's checks (gradvac_loop's fake kernel)
        torch.ops.fusedjd.gradvac_loop.default(G, perms, targets, beta, eps)
    return J[0].new_empty((n,)), G.new_empty((k, m))


@torch.library.register_fake("fusedjd::moco_gramian")
def _(J, Y, step, beta, beta_sigma):
    m, _ = _check_moco_state(J, Y, step)
    return Y.new_empty((m, m), dtype=acc_dtype(J[0].dtype))
