"""Validation shared by the fusedjd classes: checked hyper-parameter properties and input checks.
Every error names the attribute or parameter and shows what was received."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _real(name: str, value: Any) -> float:
    """The value as a float for the range check; TypeError naming the attribute unless it is a real
    number (a 0-dim real tensor with a value included, as torchjd accepts)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not (value.is_complex() or value.dtype == torch.bool):
        if value.is_meta:
            raise TypeError(f"Attribute `{name}` must be a real number with a value. Found {name}={value!r} "
                            "(a meta tensor has none).")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Attribute `{name}` must be a real number. Found {name}={value!r}.")
    return float(value)


def _kept(value: Any) -> Any:
    """The value stored for an attribute: as given (so that repr shows it as torchjd's does), but a
    tensor is copied, so that changing the caller's tensor in place later changes nothing here."""
    return value.detach().clone() if isinstance(value, Tensor) else value


def in_unit_interval(name: str) -> property:
    """A float attribute validated to lie in [0, 1] (TypeError for a non-number, ValueError
    otherwise; both name it)."""

    def setter(self, value: float) -> None:
        if not (0.0 <= _real(name, value) <= 1.0):
            raise ValueError(f"Attribute `{name}` must be in [0, 1]. Found {name}={value!r}.")
        setattr(self, "_" + name, _kept(value))

    return property(lambda self: getattr(self, "_" + name), setter)


def non_negative(name: str) -> property:
    """A float attribute validated to be >= 0 and finite (TypeError for a non-number, ValueError
    otherwise, NaN and infinity included; both name it)."""

    def setter(self, value: float) -> None:
        x = _real(name, value)
        if not (x >= 0.0):
            raise ValueError(f"Attribute `{name}` must be non-negative. Found {name}={value!r}.")
        if x == float("inf"):
            raise ValueError(f"Attribute `{name}` must be finite. Found {name}={value!r}.")
        setattr(self, "_" + name, _kept(value))

    return property(lambda self: getattr(self, "_" + name), setter)


def positive(name: str) -> property:
    """A float attribute validated to be > 0 (TypeError for a non-number, ValueError otherwise, NaN
    included; both name it), as torchjd's MGDA checks its ``epsilon``."""

    def setter(self, value: float) -> None:
        if not (_real(name, value) > 0.0):
            raise ValueError(f"Attribute `{name}` must be positive. Found {name}={value!r}.")
        setattr(self, "_" + name, _kept(value))

    return property(lambda self: getattr(self, "_" + name), setter)


def positive_int(name: str) -> property:
    """An integer attribute validated to be > 0 (TypeError for anything but an integer, bool and
    float included; ValueError otherwise; both name it)."""

    def setter(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"Attribute `{name}` must be an integer. Found {name}={value!r}.")
        if value <= 0:
            raise ValueError(f"Attribute `{name}` must be positive. Found {name}={value!r}.")
        setattr(self, "_" + name, int(value))

    return property(lambda self: getattr(self, "_" + name), setter)


DRAWS = ("torchjd", "device")


def draws_mode(name: str = "draws") -> property:
    """The ``draws`` attribute of GradVac and PCGrad: ``"torchjd"`` (visit orders drawn on the host
    from the default CPU generator, exactly as torchjd draws them) or ``"device"`` (drawn on the
    Gramian's device, graph-safe; not torchjd's stream). ValueError naming it otherwise."""

    def setter(self, value: str) -> None:
        if not isinstance(value, str) or value not in DRAWS:
            raise ValueError(f"Attribute `{name}` must be one of {DRAWS!r}. Found {name}={value!r}.")
        setattr(self, "_" + name, value)

    return property(lambda self: getattr(self, "_" + name), setter)


def forwarded(name: str, to: str) -> property:
    """An attribute read from and written to the submodule ``to`` (which validates it). The
    submodule is read from ``_modules`` directly: ``Module.__getattr__`` costs about a microsecond,
    and the aggregators read ``process_group`` this way on every call."""
    return property(lambda self: getattr(self._modules[to], name),
                    lambda self, value: setattr(self._modules[to], name, value))


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating(t: Tensor, name: str) -> None:
    """A floating tensor of a dtype the kernels take (not float8): TypeError naming it otherwise,
    raised before any state is touched."""
    if not t.is_floating_point():
        raise TypeError(f"Parameter `{name}` must be a floating-point tensor. Found dtype={t.dtype}.")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"Parameter `{name}` must have dtype float16, bfloat16, float32 or float64. Found dtype={t.dtype}."
        )


def check_square(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"Parameter `gramian` should be a square matrix of shape [m, m]. Found `gramian.shape = "
            f"{tuple(gramian.shape)}`."
        )
    check_floating(gramian, "gramian")


def check_matrix(matrix: Tensor) -> None:
    if matrix.dim() != 2:
        raise ValueError(
            f"Parameter `matrix` should be a tensor of dimension 2. Found `matrix.shape = {matrix.shape}`."
        )
    check_floating(matrix, "matrix")


def check_group_sizes(group_sizes: Any) -> list[int]:
    """The sizes as a list of ints; ValueError naming `group_sizes` unless they are a non-empty
    sequence of non-negative integers."""
    try:
        if isinstance(group_sizes, (str, bytes)):  # a string is a sequence of characters, not of sizes
            raise TypeError
        sizes = [int(s) for s in group_sizes]
        ok = all(float(s) == float(o) for s, o in zip(sizes, group_sizes, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok or len(sizes) == 0 or any(s < 0 for s in sizes):
        raise ValueError(
            f"Attribute `group_sizes` must be a non-empty sequence of non-negative integers. "
            f"Found group_sizes={group_sizes!r}."
        )
    return sizes


def check_sizes_cover(sizes: Sequence[int], matrix: Tensor) -> None:
    if sum(sizes) != matrix.shape[1]:
        raise ValueError(
            f"Attribute `group_sizes` must sum to the number of columns of `matrix` "
            f"({matrix.shape[1]}). Found sum(group_sizes)={sum(sizes)} for {len(sizes)} groups."
        )


def check_whole_tensors(groups: list[int], sizes: list[int]) -> None:
    """GroupedGradVac's groups (column counts) must end where jac_to_grad's tensors (column counts
    ``sizes``) end; ValueError naming the group otherwise."""
    n = sum(sizes)
    if sum(groups) != n:
        raise ValueError(
            f"GroupedGradVac's `group_sizes` must sum to the number of Jacobian columns n={n} of the "
            f"tensors given to jac_to_grad, got sum {sum(groups)} for group_sizes={groups}."
        )
    ends, total = set(), 0
    for s in sizes:
        total += s
        ends.add(total)
    total = 0
    for g, s in enumerate(groups):
        total += s
        if total not in ends and total != 0:
            raise ValueError(
                f"GroupedGradVac's group {g} (group_sizes={groups}) ends at column {total}, inside a tensor "
                f"(the tensors end at columns {sorted(ends)}): in jac_to_grad every group must be whole "
                "tensors, in the order of `tensors`. fusedjd.groups builds such groupings."
            )


def draws_repr(draws: str) -> str:
    """``", draws='device'"`` in a repr when the visit orders are not torchjd's (empty otherwise, so
    the default repr is torchjd's)."""
    return "" if draws == "torchjd" else f", draws={draws!r}"
