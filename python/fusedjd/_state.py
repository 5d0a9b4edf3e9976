"""State plumbing shared by the fusedjd classes: the no-grad mixin and buffer-held state that
survives a ``state_dict`` round trip (and loads torchjd's own checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class _NonDifferentiable(nn.Module):
    """Runs the module under :func:`torch.no_grad`: the outputs never require grad."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().__call__(*args, **kwargs)


_NO_STATE_SHAPE = (0,)


class _BufferState(nn.Module):
    """State held in registered buffers (so it follows ``.to(device)`` and is saved by
    ``state_dict()``). A buffer of shape ``(0,)`` means "no state yet"; loading a state dict
    adopts the saved shapes and dtypes, so a fresh instance continues a run exactly.

    ``_foreign_state`` maps a buffer name used by another library's class (torchjd's) to this
    class's buffer and a conversion, so that a checkpoint of that class loads here."""

    _state_names: tuple[str, ...] = ()
    _foreign_state: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {}

    def _init_state(self) -> None:
        for name in self._state_names:
            self.register_buffer(name, torch.empty(_NO_STATE_SHAPE))

    def _clear_state(self) -> None:
        for name in self._state_names:
            old = self._buffers[name]
            self._buffers[name] = torch.empty(_NO_STATE_SHAPE, device=old.device if old is not None else None)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``...: the state follows the device, and keeps its dtype
        (the input's for MoCo's ``Y``, the accumulation dtype for the targets and ``λ``), so that a
        model moved to bfloat16 with its aggregator inside keeps a working state (a new input dtype
        resets it at the next call, as documented)."""
        state = {name: self._buffers.pop(name) for name in self._state_names if self._buffers.get(name) is not None}
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, buf in state.items():
                # where fn sends a tensor of this dtype: its device is taken, its dtype is not
                target = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[name] = buf if buf.device == target else buf.to(target)
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        for foreign, (name, convert) in self._foreign_state.items():
            if prefix + foreign in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = convert(state_dict.pop(prefix + foreign))
        for name in self._state_names:
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if isinstance(incoming, Tensor) and current is not None and (
                current.shape != incoming.shape or current.dtype != incoming.dtype
            ):
                self._buffers[name] = torch.empty_like(incoming, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
