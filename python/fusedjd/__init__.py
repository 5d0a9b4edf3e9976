"""fusedjd: fused C++/CUDA GradVac, PCGrad and MoCo aggregators, drop-in for torchjd.

>>> import fusedjd
>>> from torchjd.autojac import mtl_backward
>>> agg = fusedjd.GradVac(beta=0.5, eps=1e-8)  # same arguments as torchjd.aggregation.GradVac
>>> # after mtl_backward(...): like torchjd.autojac.jac_to_grad, without concatenating the Jacobians
>>> # weights = fusedjd.jac_to_grad(model.parameters(), agg)
"""

from . import groups, ops, reference
from ._C import build_info
from ._gradvac import GradVac, GradVacWeighting, GroupedGradVac, PCGrad, PCGradWeighting
from ._jac_to_grad import jac_to_grad
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
    "jac_to_grad",
    "ops",
    "reference",
]
