"""fusedjd: fused C++/CUDA GradVac, PCGrad and MoCo aggregators, drop-in for torchjd.

>>> import fusedjd
>>> from torchjd.autojac import mtl_backward, jac_to_grad
>>> agg = fusedjd.GradVac(beta=0.5, eps=1e-8)  # same arguments as torchjd.aggregation.GradVac
"""

from . import groups, ops, reference
from ._C import build_info
from ._gradvac import GradVac, GradVacWeighting, GroupedGradVac, PCGrad, PCGradWeighting
from ._moco import MoCo, MoCoWeighting

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "GradVac",
    "GradVacWeighting",
    "GroupedGradVac",
    "MoCo",
    "MoCoWeighting",
    "PCGrad",
    "PCGradWeighting",
    "groups",
    "ops",
    "reference",
]
