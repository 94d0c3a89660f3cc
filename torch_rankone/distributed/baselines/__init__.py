"""Baselines for NewtonLearn's experiments (Islamov et al. 2021, §4): distributed Newton,
DCGD, DIANA, ADIANA, BFGS and DINGO over simulated nodes.

Every baseline has NewtonLearn's interface and bookkeeping: ``Method([x], features, targets,
loss=..., lam=..., num_nodes=n, accounting="theory" | "authors-code" | "authors-text",
generator=...)``; ``step()`` (no closure) returns ``P(x^k)``; ``opt.state[x]["bits_sent"]`` is
the cumulative count of the bits sent (initialisation included), ``opt.history`` holds
``{"loss", "bits", "time"}`` per iteration. ``"theory"`` sums all nodes' uplink with the
theory's constants; ``"authors-code"`` counts one node's as the authors' published experiment
code does, ``"authors-text"`` all nodes' as the paper's text states, both with the authors'
constants and stepsizes (:mod:`torch_rankone.distributed.accounting`). Node ``i`` owns
``P_i = f_i + (λ/2)‖x‖²`` (the baselines' theory is for ``min (1/n) Σ P_i``).
"""

from ._common import GLMBaseline, GLMNodes, global_smoothness, paper_message_bits, smoothness
from .bfgs import BFGS, bfgs_inverse_update
from .compressed_gradient import (
    ADIANA,
    DCGD,
    DIANA,
    ADIANAParameters,
    adiana_parameters,
    authors_dcgd_stepsize,
    authors_diana_parameters,
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
    "authors_dcgd_stepsize",
    "authors_diana_parameters",
    "bfgs_inverse_update",
    "dcgd_stepsize",
    "diana_parameters",
    "global_smoothness",
    "paper_message_bits",
    "smoothness",
]
