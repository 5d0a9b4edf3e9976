"""Shared pieces of the fusedjd tests: the device parameter and the input generators (group
sizes, matrices) every test file draws from. The references every kernel is checked against are
shipped: :mod:`fusedjd.reference`."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


GPU = torch.cuda.is_available()

# "cuda" is always a parameter: skipped, visibly, where no GPU is present. A GPU with a build of
# fusedjd that lacks the CUDA kernels fails (test_cuda.py::test_gpu_build_has_cuda_kernels and
# every cuda case), it does not skip.
_NO_GPU = "no CUDA GPU present (the CUDA kernels still run, emulated, in test_cuda_emulated.py)"
requires_cuda = pytest.mark.skipif(not GPU, reason=_NO_GPU)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def group_sizes(n: int, k: int, gen: torch.Generator) -> list[int]:
    """k random non-negative consecutive group sizes summing to n (some may be 0)."""
    if k == 1:
        return [n]
    cuts = sorted(torch.randint(0, n + 1, (k - 1,), generator=gen).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


def matrix(m: int, n: int, dtype: torch.dtype, gen: torch.Generator, kind: str = "random") -> torch.Tensor:
    """An m x n matrix in ``dtype``: ``"random"`` (normal entries), ``"collinear"`` (rows along one
    direction, both signs, one zero row) or ``"scaled"`` (normal entries times 1e3)."""
    J = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if kind == "collinear" and m > 1:
        J = torch.randn(m, 1, generator=gen, dtype=torch.float64) * J[:1]
        J[m // 2] = 0.0
    if kind == "scaled":
        J = J * 1e3
    return J.to(dtype)


class DispatchRecorder(TorchDispatchMode):
    """A torch-dispatch mode (the profiler's and FakeTensor's mechanism) that records the name of
    every op it sees, e.g. ``"fusedjd.gramian.default"``, in ``seen``."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def packets(self) -> set[str]:
        """The ops seen, without their overload: ``{"fusedjd.gramian", "aten.mm", ...}``."""
        return {name.rsplit(".", 1)[0] for name in self.seen}


# scripts/check_mutants.sh: with FUSEDJD_MUTANT set, one planted wrong answer (tests/mutants.py)
# replaces an op before any test module is imported; without it nothing is planted.
import mutants as _mutants  # noqa: E402

MUTANT = _mutants.plant()


def pytest_report_header(config):
    return f"fusedjd: the mutant {MUTANT!r} is planted (tests/mutants.py): tests are expected to fail" if MUTANT else None
