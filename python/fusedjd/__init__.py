"""fusedjd: fused C++/CUDA GradVac, PCGrad, MoCo, UPGrad, DualProj and MGDA aggregators, drop-in for torchjd.

>>> import fusedjd
>>> from torchjd.autojac import mtl_backward
>>> agg = fusedjd.GradVac(beta=0.5, eps=1e-8)  # same arguments as torchjd.aggregation.GradVac
>>> # after mtl_backward(...): like torchjd.autojac.jac_to_grad, without concatenating the Jacobians
>>> # weights = fusedjd.jac_to_grad(model.parameters(), agg)
"""

import torch  # noqa: F401  (first: fusedjd._C links against the libraries torch loads)

from . import _C, _cpu, groups, ops, reference
from ._dualproj import DualProj, DualProjWeighting
from ._gradvac import GradVac, GradVacWeighting
from ._grouped_gradvac import GroupedGradVac
from ._jac_to_grad import jac_to_grad
from ._mgda import MGDA, MGDAWeighting
from ._moco import MoCo, MoCoWeighting
from ._pcgrad import PCGrad, PCGradWeighting
from ._projector import Projector
from ._upgrad import UPGrad, UPGradWeighting

__version__ = "0.1.0"


def build_info() -> dict:
    """How the installed library was built, and what it runs here: ``cuda`` (CUDA kernels built),
    ``cuda_archs`` (the archs they were compiled for, ``compute_XX`` being PTX), ``torch_version``
    (the torch it was built against), ``openmp``, ``cpu_levels`` (the instruction-set levels its
    CPU kernels were built for) and ``cpu_capability`` (the level in use on this CPU: the best built
    one it supports, capped by ``FUSEDJD_CPU_CAPABILITY``)."""
    info = dict(_C.build_info())
    info["cpu_levels"] = list(_cpu.BUILT)
    info["cpu_capability"] = _cpu.LEVEL
    return info

__all__ = [
    "build_info",
    "DualProj",
    "DualProjWeighting",
    "GradVac",
    "GradVacWeighting",
    "GroupedGradVac",
    "MGDA",
    "MGDAWeighting",
    "MoCo",
    "MoCoWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Projector",
    "UPGrad",
    "UPGradWeighting",
    "groups",
    "jac_to_grad",
    "ops",
    "reference",
]
