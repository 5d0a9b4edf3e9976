"""Column-group sizes for :class:`fusedjd.GroupedGradVac`, for the GradVac paper's granularities.

Each helper returns the list of group sizes in the column order that
``torchjd.autojac.jac_to_grad(params, ...)`` uses for the same parameters (the order of the
parameter iterable, each tensor flattened).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

__all__ = ["whole_model", "enc_dec", "all_layer", "all_matrix"]


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"Expected tensors (parameters), found {type(p).__name__}.")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def whole_model(params: Iterable[Tensor]) -> list[int]:
    """One group holding every parameter: ``[sum of numel]``."""
    return [sum(p.numel() for p in _unique(params))]


def enc_dec(encoder: nn.Module, decoder: nn.Module) -> list[int]:
    """Two groups, the encoder's parameters then the decoder's (columns of
    ``jac_to_grad([*encoder.parameters(), *decoder.parameters()], ...)``)."""
    return [whole_model(encoder.parameters())[0], whole_model(decoder.parameters())[0]]


def all_layer(module: nn.Module) -> list[int]:
    """One group per module that has parameters of its own (the leaf layers, for the usual
    models), in ``module.modules()`` order: the column order of
    ``jac_to_grad(module.parameters(), ...)``."""
    seen: set[int] = set()
    sizes = []
    for mod in module.modules():
        size = 0
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                size += p.numel()
        if size > 0:
            sizes.append(size)
    return sizes


def all_matrix(params: Iterable[Tensor]) -> list[int]:
    """One group per parameter tensor."""
    return [p.numel() for p in _unique(params)]
