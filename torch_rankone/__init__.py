"""torch_rankone: second-order optimizers for PyTorch.

Modules: :mod:`~torch_rankone.curvature` (HVPs, per-sample gradients, top
eigenvalue), :mod:`~torch_rankone.linalg` (Woodbury, Neumann/LiSSA/CG inverse-HVPs,
inverse-gradient HVPs, incremental inverses, dense Newton and cubic steps),
:mod:`~torch_rankone.glm` (the generalised linear model NewtonLearn solves),
:mod:`~torch_rankone.data` (LIBSVM datasets).
"""

from . import curvature, data, distributed, glm, influence, linalg, optim
from ._ext import has_extension
from .optim import FisherNewton, NeumannIHVP, NewtonLearn, RankOneNewton

__version__ = "0.2.0"

__all__ = [
    "curvature",
    "linalg",
    "glm",
    "data",
    "influence",
    "optim",
    "distributed",
    "RankOneNewton",
    "FisherNewton",
    "NeumannIHVP",
    "NewtonLearn",
    "has_extension",
    "__version__",
]
