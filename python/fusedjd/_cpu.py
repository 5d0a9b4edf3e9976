"""Loads fusedjd's CPU kernels built for the best instruction-set level this CPU supports.

The CPU kernels are compiled once per level (``fusedjd/_cpu_avx512``, ``_cpu_avx2``,
``_cpu_default`` on x86-64: see setup.py), each a library that registers the same CPU kernels;
exactly one is loaded per process, the best one that was built and that the CPU (cpuid, through
``fusedjd._C.cpu_supports``) can run. ``FUSEDJD_CPU_CAPABILITY=avx512|avx2|default`` caps the
choice at that level (for tests, or a CPU that misreports), as PyTorch's ``ATEN_CPU_CAPABILITY``
does for its own kernels.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _C

LEVELS = ("avx512", "avx2", "default")  # best first
ENV = "FUSEDJD_CPU_CAPABILITY"


def _choose(built: list[str], supported: list[str], forced: str | None) -> str:
    if forced is not None and forced not in LEVELS:
        raise ValueError(f"Environment variable `{ENV}` must be one of {LEVELS}. Found {ENV}={forced!r}.")
    cap = LEVELS.index(forced) if forced is not None else 0
    for level in LEVELS[cap:]:
        if level in built and level in supported:
            return level
    raise ImportError(
        f"fusedjd: no CPU kernels this CPU can run were built (built: {built}, this CPU runs: {supported}"
        f"{f', capped by {ENV}={forced}' if forced else ''}); reinstall fusedjd from source"
    )


def _load() -> str:
    if torch._C._dispatch_has_kernel_for_dispatch_key("fusedjd::gramian", "CPU"):
        return "built-in"  # a build that compiled the CPU kernels into _C itself (the sanitizer build)
    built = [level for level in _C.build_info()["cpu_levels"].split(",") if level]
    level = _choose(built, list(_C.cpu_supports()), os.environ.get(ENV) or None)
    spec = importlib.util.find_spec(f"fusedjd._cpu_{level}")
    if spec is None or spec.origin is None:
        raise ImportError(f"fusedjd: the CPU kernels for {level!r} (fusedjd._cpu_{level}) are missing from this install")
    torch.ops.load_library(spec.origin)
    return level


#: The instruction-set level of the CPU kernels in use.
LEVEL = _load()
BUILT = tuple(level for level in _C.build_info()["cpu_levels"].split(",") if level)
