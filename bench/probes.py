"""The benchmark's floors: ``torch.ops.fusedjd_bench`` (bench/probes.cpp: a vectorized read of
tensors, and the Gramian engine's register blocks on rows in L1), compiled on first use with the
compiler flags of the CPU kernels' level this process loaded (``fusedjd._levels``), so that they
measure with the instructions the kernels use. Benchmark code: not part of what fusedjd installs.
The build is cached by torch (``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``)."""

from __future__ import annotations

import os
import platform

import torch
from torch.utils import cpp_extension

import fusedjd
from fusedjd._levels import X86

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load() -> str:
    """Builds (once per level and flags) and loads the probes; returns the level they were built for."""
    level = fusedjd.build_info()["cpu_capability"]
    if hasattr(torch.ops.fusedjd_bench, "read"):  # (loaded already in this process)
        return level
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    flags = X86.get(level, X86["default"]) if x86 else []  # ("built-in", the sanitizer build: the default level's)
    cpp_extension.load(
        name=f"fusedjd_bench_{level.replace('-', '_')}",
        sources=[os.path.join(HERE, "probes.cpp")],
        extra_cflags=["-O3", "-std=c++17", "-fopenmp", *flags, "-I" + os.path.join(ROOT, "csrc", "cpu")],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=bool(os.environ.get("FUSEDJD_BENCH_VERBOSE")),
    )
    return level
