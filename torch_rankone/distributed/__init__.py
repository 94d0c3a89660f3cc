"""Distributed NewtonLearn support: compressors, communication accounting,
the parameter-server protocol over simulated nodes or ``torch.distributed``, and the paper's
baselines (Newton, DCGD, DIANA, ADIANA, BFGS, DINGO) with the same accounting."""

from . import accounting, baselines, compressors, transports
from .compressors import (  # noqa: F401  (re-exported through compressors.__all__)
    Bernoulli,
    Compressor,
    Identity,
    NaturalCompression,
    RandK,
    RandomDithering,
    TopK,
)
from .transports import ProtocolError

__all__ = [
    "accounting",
    "baselines",
    "compressors",
    "transports",
    *compressors.__all__,
    "ProtocolError",
]
