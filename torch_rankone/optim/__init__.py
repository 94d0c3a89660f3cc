"""The optimizers: ``torch.optim.Optimizer`` subclasses that replace Adam.

Curvature sources for ``step(closure=None)`` (``hvp="auto" | "exact" | "fd"``), shared by all:

1. graph gradients — ``loss.backward(create_graph=True); opt.step()``: exact HVPs;
2. a loss closure — ``opt.step(lambda: loss_fn(model(x), y))`` without ``backward``: exact HVPs;
3. a backward closure (``torch.optim.LBFGS`` / Lightning convention) — central finite-difference
   HVPs, two more closure calls per HVP, parameters restored exactly.
"""

from ._data_parallel import ReplicaMismatchError
from ._protocol import CurvatureError, SecondOrderOptimizer
from .fisher_newton import FisherNewton
from .neumann_ihvp import NeumannIHVP
from .newton_learn import NewtonLearn
from .rank_one_newton import RankOneNewton

__all__ = [
    "CurvatureError",
    "ReplicaMismatchError",
    "SecondOrderOptimizer",
    "RankOneNewton",
    "FisherNewton",
    "NeumannIHVP",
    "NewtonLearn",
]
