"""Shared pieces of the fusedjd tests: the device parameter and the input generators. The
references every kernel is checked against are shipped: :mod:`fusedjd.reference`."""

from __future__ import annotations

import pytest
import torch

import fusedjd

GPU = torch.cuda.is_available()

# "cuda" is always a parameter: skipped, visibly, where no GPU is present. A GPU with a build of
# fusedjd that lacks the CUDA kernels fails (test_cuda.py::test_gpu_build_has_cuda_kernels and
# every cuda case), it does not skip.
_NO_GPU = "no CUDA GPU present (the CUDA kernels still run, emulated, in test_cuda_emulated.py)"
requires_cuda = pytest.mark.skipif(not GPU, reason=_NO_GPU)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def random_matrix(kind: str, m: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``[m, n]`` test input of one kind: ``random`` (Gaussian), ``collinear`` (rows along one
    direction with both signs and, for m > 1, one zero row), ``scaled`` (Gaussian times 1e15 and
    times 1e-15 in alternate rows)."""
    J = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if kind == "collinear" and m > 0:
        v = J[:1]
        J = torch.cat([v * (k + 1) * (-1) ** k for k in range(m)])
        if m > 1:
            J[m // 2] = 0
    elif kind == "scaled":
        J = J * torch.tensor([1e15 if i % 2 == 0 else 1e-15 for i in range(m)], dtype=torch.float64).view(m, 1)
    elif kind != "random":
        raise ValueError(kind)
    return J.to(dtype)
