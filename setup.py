"""Build of the fusedjd extension.

CUDA kernels are compiled when torch was built with CUDA (``torch.version.cuda``)
and a CUDA toolkit is found; no visible GPU is needed. ``FUSEDJD_CUDA=0`` or
``=1`` overrides the detection. ``TORCH_CUDA_ARCH_LIST`` is respected (Hopper:
``9.0``); unset, the visible GPUs' archs are built, or ``8.0;9.0+PTX`` when no GPU is visible
(Ampere, Hopper, and PTX that newer GPUs compile when they load it). ``FUSEDJD_PORTABLE=1``
drops ``-march=native`` from the CPU flags.

Install with ``pip install --no-build-isolation -e .`` so the build uses the
torch already installed.
"""

import glob
import os
import re

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


def _extension():
    cpu_sources = ["csrc/fusedjd.cpp"] + sorted(glob.glob("csrc/composite/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    import torch

    defines = ["-DFUSEDJD_PYTHON_MODULE", f'-DFUSEDJD_TORCH_VERSION="{torch.__version__}"']
    # -fopenmp: at::parallel_for is a header template, so fusedjd's own loops are parallel only
    # when this library itself is compiled (and linked) with OpenMP, as torch is.
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + defines
    link = ["-fopenmp"]
    if os.environ.get("FUSEDJD_PORTABLE", "0") in ("", "0"):
        cxx.append("-march=native")
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to take the arch from: Ampere and Hopper cubins, plus PTX that newer GPUs compile
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cu"))
        # the archs nvcc will be given (what TORCH_CUDA_ARCH_LIST or the visible GPUs select)
        archs = ",".join(sorted(set(re.findall(r"code=((?:sm|compute)_\d+a?)", " ".join(cpp_extension._get_cuda_arch_flags())))))
        cuda_defines = ["-DFUSEDJD_WITH_CUDA", f'-DFUSEDJD_CUDA_ARCHS="{archs}"']
        cxx += cuda_defines
        nvcc = ["-O3", "-std=c++17", "-lineinfo"] + defines + cuda_defines
        return cpp_extension.CUDAExtension(
            "fusedjd._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link
        )
    return cpp_extension.CppExtension("fusedjd._C", cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="fusedjd",
    version="0.1.0",
    description="Fused C++/CUDA GradVac, PCGrad and MoCo aggregators for torchjd",
    package_dir={"": "python"},
    packages=["fusedjd"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=["torch>=2.4", "torchjd>=0.18"],
    extras_require={"plot": ["matplotlib"], "test": ["pytest", "numpy"]},
    python_requires=">=3.10",
)
