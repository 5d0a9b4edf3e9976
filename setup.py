"""Build of the fusedjd extension.

CUDA kernels are compiled when torch was built with CUDA (``torch.version.cuda``)
and a CUDA toolkit is found; no visible GPU is needed. ``FUSEDJD_CUDA=0`` or
``=1`` overrides the detection. ``TORCH_CUDA_ARCH_LIST`` is respected (Hopper:
``9.0``); unset, the visible GPUs' archs are built, or ``8.0;9.0+PTX`` when no GPU is visible
(Ampere, Hopper, and PTX that newer GPUs compile when they load it).

The CPU kernels are built once per instruction-set level (x86-64: ``avx512``, ``avx2``,
``default``), each into its own library, and the best one the CPU supports is loaded at import
(``FUSEDJD_CPU_CAPABILITY`` forces a lower one); ``FUSEDJD_CPU_LEVELS="avx2,default"`` builds
fewer. No ``-march=native``: a wheel runs on any x86-64 CPU.

Install with ``pip install --no-build-isolation -e .`` so the build uses the
torch already installed.
"""

import glob
import os
import platform
import re
import runpy

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible


def _want_cuda() -> bool:
    flag = os.environ.get("FUSEDJD_CUDA")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "False")
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


# The CPU kernels are compiled once per instruction-set level, each into its own library, and
# fusedjd loads the best one the CPU supports (python/fusedjd/_cpu.py): a wheel built anywhere runs
# on any x86-64 CPU. Only one of them is ever loaded in a process, so no inline function compiled
# for one level can end up called on a CPU of a lower one.
CPU_LEVELS_X86 = runpy.run_path(os.path.join(ROOT, "python", "fusedjd", "_levels.py"))["X86"]


def _cpu_levels() -> dict[str, list[str]]:
    """The levels to build: all three on x86-64 (FUSEDJD_CPU_LEVELS="avx2,default" builds fewer),
    the compiler's default elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {"default": []}
    wanted = os.environ.get("FUSEDJD_CPU_LEVELS")
    names = [x.strip() for x in wanted.split(",") if x.strip()] if wanted else list(CPU_LEVELS_X86)
    unknown = sorted(set(names) - set(CPU_LEVELS_X86))
    if unknown or "default" not in names:
        raise SystemExit(f"FUSEDJD_CPU_LEVELS must name levels among {list(CPU_LEVELS_X86)}, 'default' included; "
                         f"got {wanted!r}")
    return {name: CPU_LEVELS_X86[name] for name in names}


def _extensions():
    import torch

    defines = ["-DFUSEDJD_PYTHON_MODULE", f'-DFUSEDJD_TORCH_VERSION="{torch.__version__}"']
    # -fopenmp: at::parallel_for is a header template, so fusedjd's own loops are parallel only
    # when this library itself is compiled (and linked) with OpenMP, as torch is.
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + defines
    link = ["-fopenmp"]
    levels = _cpu_levels()
    cxx.append(f'-DFUSEDJD_CPU_LEVELS="{",".join(levels)}"')
    cpu_kernels = sorted(glob.glob("csrc/cpu/*.cpp"))
    exts = [
        cpp_extension.CppExtension(f"fusedjd._cpu_{name}", cpu_kernels,
                                   extra_compile_args={"cxx": cxx + flags + [f'-DFUSEDJD_CPU_LEVEL="{name}"']},
                                   extra_link_args=link)
        for name, flags in levels.items()
    ]
    sources = ["csrc/fusedjd.cpp"] + sorted(glob.glob("csrc/composite/*.cpp"))
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to take the arch from: Ampere and Hopper cubins, plus PTX that newer GPUs compile
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # the archs nvcc will be given (what TORCH_CUDA_ARCH_LIST or the visible GPUs select)
        archs = ",".join(sorted(set(re.findall(r"code=((?:sm|compute)_\d+a?)", " ".join(cpp_extension._get_cuda_arch_flags())))))
        cuda_defines = ["-DFUSEDJD_WITH_CUDA", f'-DFUSEDJD_CUDA_ARCHS="{archs}"']
        nvcc = ["-O3", "-std=c++17", "-lineinfo"] + defines + cuda_defines
        exts.insert(0, cpp_extension.CUDAExtension(
            "fusedjd._C", sources, extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc}, extra_link_args=link))
    else:
        exts.insert(0, cpp_extension.CppExtension("fusedjd._C", sources, extra_compile_args={"cxx": cxx},
                                                  extra_link_args=link))
    return exts


class _BuildExt(cpp_extension.BuildExtension):
    """The CPU levels compile the same sources to the same object paths, so the extensions build one
    after another even under ``build_ext -j`` (which would link one level's objects into another's
    library); each extension's sources still compile in parallel under ninja (MAX_JOBS)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.parallel = None


setup(
    name="fusedjd",
    version="0.1.0",
    description="Fused C++/CUDA GradVac, PCGrad and MoCo aggregators for torchjd",
    package_dir={"": "python"},
    packages=["fusedjd"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt},
    install_requires=["torch>=2.8", "torchjd>=0.18"],  # torch: the oldest tested is 2.8 (README)
    extras_require={"plot": ["matplotlib"], "test": ["pytest", "numpy"]},
    python_requires=">=3.10",
)
