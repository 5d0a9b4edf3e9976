"""Pieces shared by the fusedjd classes: the no-grad mixin, buffer-held state that
survives a ``state_dict`` round trip, input checks and the permutation draws."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .ops import _acc_dtype as _loop_dtype  # noqa: F401  (also loads the operator library)


class _NonDifferentiable(nn.Module):
    """Runs the module under :func:`torch.no_grad`: the outputs never require grad."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().__call__(*args, **kwargs)


_NO_STATE_SHAPE = (0,)


class _BufferState(nn.Module):
    """State held in registered buffers (so it follows ``.to(device)`` and is saved by
    ``state_dict()``). A buffer of shape ``(0,)`` means "no state yet"; loading a state
    dict adopts the saved shapes and dtypes, so a fresh instance continues a run exactly."""

    _state_names: tuple[str, ...] = ()

    def _init_state(self) -> None:
        for name in self._state_names:
            self.register_buffer(name, torch.empty(_NO_STATE_SHAPE))

    def _clear_state(self) -> None:
        for name in self._state_names:
            old = self._buffers[name]
            self._buffers[name] = torch.empty(_NO_STATE_SHAPE, device=old.device if old is not None else None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        for name in self._state_names:
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if isinstance(incoming, Tensor) and current is not None and (
                current.shape != incoming.shape or current.dtype != incoming.dtype
            ):
                self._buffers[name] = torch.empty_like(incoming, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def in_unit_interval(name: str) -> property:
    """A float attribute validated to lie in [0, 1] (ValueError naming it otherwise)."""

    def setter(self, value: float) -> None:
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"Attribute `{name}` must be in [0, 1]. Found {name}={value!r}.")
        setattr(self, "_" + name, value)

    return property(lambda self: getattr(self, "_" + name), setter)


def non_negative(name: str) -> property:
    """A float attribute validated to be >= 0 (ValueError naming it otherwise; NaN is refused)."""

    def setter(self, value: float) -> None:
        if not (value >= 0.0):
            raise ValueError(f"Attribute `{name}` must be non-negative. Found {name}={value!r}.")
        setattr(self, "_" + name, value)

    return property(lambda self: getattr(self, "_" + name), setter)


def forwarded(name: str, to: str = "gramian_weighting") -> property:
    """An attribute read from and written to the submodule `to` (which validates it)."""
    return property(lambda self: getattr(getattr(self, to), name),
                    lambda self, value: setattr(getattr(self, to), name, value))


def _check_floating(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"Parameter `{name}` must be a floating-point tensor. Found dtype={t.dtype}.")


def _check_square(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"Parameter `gramian` should be a square matrix of shape [m, m]. Found `gramian.shape = "
            f"{tuple(gramian.shape)}`."
        )
    _check_floating(gramian, "gramian")


def _check_matrix(matrix: Tensor) -> None:
    if matrix.dim() != 2:
        raise ValueError(
            f"Parameter `matrix` should be a tensor of dimension 2. Found `matrix.shape = {matrix.shape}`."
        )
    _check_floating(matrix, "matrix")


def _check_group_sizes(group_sizes: Any) -> list[int]:
    try:
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


def _to_device(perms: Tensor, device: torch.device) -> Tensor:
    """Moves CPU-drawn permutations to ``device`` without a host sync."""
    if device.type == "cpu":
        return perms
    if device.type == "cuda":
        perms = perms.pin_memory()
    return perms.to(device, non_blocking=True)


def draw_gradvac_perms(k: int, m: int) -> Tensor:
    """Visit orders ``[k, m, m-1]`` drawn exactly as torchjd's GradVac draws them: for each
    group, for each row ``i``, ``torch.randperm(m - 1)`` mapped onto the other rows."""
    return torch.ops.fusedjd.draw_perms.default(k, m, False)


def draw_pcgrad_perms(k: int, m: int) -> Tensor:
    """Visit orders ``[k, m, m-1]`` drawn exactly as torchjd's PCGrad draws them: for each
    row ``i``, ``torch.randperm(m)`` with ``i`` skipped."""
    return torch.ops.fusedjd.draw_perms.default(k, m, True)
