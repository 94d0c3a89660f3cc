"""Baselines for NewtonLearn's experiments (Islamov et al. 2021, §4): distributed Newton,
DCGD, DIANA, ADIANA, BFGS and DINGO over simulated nodes.

Every baseline has NewtonLearn's interface and bookkeeping: ``Method([x], features, targets,
loss=..., lam=..., num_nodes=n, accounting="realistic" | "paper", generator=...)``; ``step()``
(no closure) returns ``P(x^k)``; ``opt.state[x]["bits_sent"]`` is the cumulative count of the
bits the nodes sent (initialisation included), ``opt.history`` holds ``{"loss", "bits",
"time"}`` per iteration. ``"realistic"`` sums all nodes' uplink; ``"paper"`` counts one node's,
as the authors' code does (:mod:`torch_rankone.distributed.accounting`). Node ``i`` owns
``P_i = f_i + (λ/2)‖x‖²`` (the baselines' theory is for ``min (1/n) Σ P_i``).
"""

from ._common import GLMBaseline, GLMNodes, paper_message_bits, smoothness
from .bfgs import BFGS, bfgs_inverse_update
from .compressed_gradient import (
    ADIANA,
    DCGD,
    DIANA,
    ADIANAParameters,
    adiana_parameters,
    dcgd_stepsize,
    diana_parameters,
)
from .dingo import DINGO
from .newton import DistributedNewton

__all__ = [
    "ADIANA",
    "BFGS",
    "DCGD",
    "DIANA",
    "DINGO",
    "DistributedNewton",
    "ADIANAParameters",
    "GLMBaseline",
    "GLMNodes",
    "adiana_parameters",
    "bfgs_inverse_update",
    "dcgd_stepsize",
    "diana_parameters",
    "paper_message_bits",
    "smoothness",
]
