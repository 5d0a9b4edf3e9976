"""Shared pieces of the fusedjd tests: the device parameter and the input generators. The
references every kernel is checked against are shipped: :mod:`fusedjd.reference`."""

from __future__ import annotations

import pytest
import torch


GPU = torch.cuda.is_available()

# "cuda" is always a parameter: skipped, visibly, where no GPU is present. A GPU with a build of
# fusedjd that lacks the CUDA kernels fails (test_cuda.py::test_gpu_build_has_cuda_kernels and
# every cuda case), it does not skip.
_NO_GPU = "no CUDA GPU present (the CUDA kernels still run, emulated, in test_cuda_emulated.py)"
requires_cuda = pytest.mark.skipif(not GPU, reason=_NO_GPU)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

