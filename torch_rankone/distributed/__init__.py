"""Distributed NewtonLearn support (SPEC §4.4, seed 002): compressors, communication accounting
and the parameter-server protocol over simulated nodes or ``torch.distributed``."""

from . import accounting, compressors, protocol
from .compressors import (
    Bernoulli,
    Compressor,
    Identity,
    NaturalCompression,
    RandK,
    RandomDithering,
    TopK,
)
from .protocol import ProtocolError

__all__ = [
    "accounting",
    "compressors",
    "protocol",
    "Compressor",
    "Identity",
    "RandK",
    "TopK",
    "RandomDithering",
    "NaturalCompression",
    "Bernoulli",
    "ProtocolError",
]
