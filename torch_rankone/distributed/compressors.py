"""Compression operators for the nodes' messages (Islamov et al. 2021, §3.4).

A compressor ``C: R^dim → R^dim`` is *unbiased with variance parameter* ``ω`` when

    E[C(x)] = x,        E‖C(x)‖² ≤ (ω + 1) ‖x‖²          (Islamov et al. 2021, eqs. (17)–(18)).

Every compressor here acts on the last dimension of a tensor, row by row and independently
(a batch of shape ``(..., dim)`` is a batch of messages, e.g. one per node), and draws its
randomness from the ``generator`` passed to ``__call__``. The amount drawn depends only on the
input's shape, never on its values, so ranks that draw the same shape from generators in the
same state get the same randomness (what keeps simulated and ``torch.distributed`` runs of
NewtonLearn identical).

``bits(dim)`` is the cost of one message of a ``dim``-vector in bits (values as 32-bit floats,
indices of a sparse message as one ``log2 C(dim, r)``-bit subset index), and
``message_bits(out)`` the realised cost of each row of a compressed batch (differs from
``bits`` only for :class:`Bernoulli`, whose skipped messages cost nothing).

References: Beznosikov et al., "On biased compression for distributed learning" (2020), for
RandK/TopK; Alistarh et al., "QSGD" (2017), random dithering; Horváth et al., "Natural
compression for distributed deep learning" (2019).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from .._validation import check_int

__all__ = [
    "Compressor",
    "Identity",
    "RandK",
    "TopK",
    "RandomDithering",
    "NaturalCompression",
    "Bernoulli",
]

FLOAT_BITS = 32  # every value travels as a 32-bit float (the paper's convention)


def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``U[0, 1)`` of ``x``'s shape drawn on the generator's device, moved to ``x``'s device."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=device)
    return u.to(device=x.device)


def log2_binomial(n: int, k: int) -> float:
    """``log2 C(n, k)``: bits of an index into the ``k``-subsets of ``n`` entries."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


class Compressor(abc.ABC):
    """Base class: ``__call__(x, generator)``, ``omega(dim)``, ``bits(dim)``, ``message_bits``.

    A subclass that leaves one of the first three out cannot be instantiated (``TypeError``)."""

    #: ``E[C(x)] = x`` holds
    unbiased: bool = True

    @abc.abstractmethod
    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``C(x)`` of every row of ``x`` (last dimension), one independent draw per row."""

    @abc.abstractmethod
    def omega(self, dim: int) -> float:
        """Variance parameter ``ω`` of (18) for vectors of length ``dim``."""

    @abc.abstractmethod
    def bits(self, dim: int) -> float:
        """Bits of one compressed message of a ``dim``-vector."""

    def message_bits(self, out: Tensor) -> Tensor:
        """Realised bits of each row of a compressed batch ``out`` (shape ``out.shape[:-1]``)."""
        return torch.full(out.shape[:-1], self.bits(out.shape[-1]), dtype=torch.float64)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Identity(Compressor):
    """``C(x) = x``: ``ω = 0``, ``32·dim`` bits."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x.clone()

    def omega(self, dim: int) -> float:
        return 0.0

    def bits(self, dim: int) -> float:
        return float(FLOAT_BITS * dim)


class _Sparsifier(Compressor):
    """Keep ``r`` entries per row; cost ``32r`` for the values plus ``log2 C(dim, r)`` for
    which ``r``-subset they are."""

    def __init__(self, r: int = 1) -> None:
        self.r = check_int("r", r)

    def _k(self, dim: int) -> int:
        if self.r > dim:
            raise ValueError(f"{type(self).__name__}(r={self.r}) needs dim >= r, got dim={dim}")
        return self.r

    def bits(self, dim: int) -> float:
        k = self._k(dim)
        return FLOAT_BITS * k + log2_binomial(dim, k)

    def _keep(self, x: Tensor, idx: Tensor, scale: float) -> Tensor:
        return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx) * scale)


class RandK(_Sparsifier):
    """Random-``r`` sparsification: ``r`` entries chosen uniformly without replacement, scaled
    by ``dim/r`` (unbiased), ``ω = dim/r − 1``.

    The subset is the ``r`` largest of ``dim`` uniform keys per row, so the randomness drawn is
    ``dim`` numbers per row whatever ``r`` is.
    """

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        k = self._k(x.shape[-1])
        idx = _uniform(x, generator).topk(k, dim=-1).indices
        return self._keep(x, idx, x.shape[-1] / k)

    def omega(self, dim: int) -> float:
        return dim / self._k(dim) - 1.0


class TopK(_Sparsifier):
    """The ``r`` entries of largest magnitude, unscaled (deterministic, *biased*).

    ``‖C(x)‖ ≤ ‖x‖``, so (18) holds with ``ω = 0`` (hence a default ``η = 1`` in NewtonLearn, as
    in FedNL), but ``E[C(x)] ≠ x``: the paper's theory does not cover it. It is a contraction,
    ``‖C(x) − x‖² ≤ (1 − r/dim) ‖x‖²``.
    """

    unbiased = False

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        idx = x.abs().topk(self._k(x.shape[-1]), dim=-1).indices
        return self._keep(x, idx, 1.0)

    def omega(self, dim: int) -> float:
        return 0.0


class RandomDithering(Compressor):
    """Random dithering (QSGD) with ``s`` levels: ``C(x) = ‖x‖ sign(x) ξ(x)/s``, where
    ``ξ_j ∈ {l, l+1}`` for ``l = ⌊s|x_j|/‖x‖⌋``, rounded up with probability ``s|x_j|/‖x‖ − l``
    (unbiased), ``ω = min(dim/s², √dim/s)``.

    Bits: the norm (32) plus, per entry, a sign and a level in ``{0..s}`` with a fixed-length
    code, ``32 + dim·(1 + log2(s + 1))``. (QSGD's Elias coding gets ``2.8·dim + 32`` for
    ``s = √dim``, the count the seed quotes; the fixed-length code is what a simple
    implementation sends.)
    """

    def __init__(self, s: int = 1) -> None:
        self.s = check_int("s", s)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        level = x.abs() / torch.where(norm > 0, norm, 1.0) * self.s
        low = level.floor()
        xi = low + (_uniform(x, generator) < (level - low)).to(x.dtype)
        return norm * x.sign() * xi / self.s

    def omega(self, dim: int) -> float:
        return min(dim / self.s**2, math.sqrt(dim) / self.s)

    def bits(self, dim: int) -> float:
        return FLOAT_BITS + dim * (1 + math.log2(self.s + 1))


class NaturalCompression(Compressor):
    """Natural compression: each entry rounded randomly to one of the two nearest powers of two,
    ``2^a ≤ |t| < 2^(a+1)`` becoming ``2^(a+1)`` with probability ``|t|/2^a − 1`` (unbiased),
    ``ω = 1/8``; 9 bits per entry (sign and 8-bit exponent)."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mag = x.abs()
        low = torch.exp2(torch.floor(torch.log2(torch.where(mag > 0, mag, 1.0))))
        up = _uniform(x, generator) < (mag / low - 1.0)
        return torch.where(mag > 0, x.sign() * low * (1.0 + up.to(x.dtype)), 0.0)

    def omega(self, dim: int) -> float:
        return 1.0 / 8.0

    def bits(self, dim: int) -> float:
        return 9.0 * dim


class Bernoulli(Compressor):
    """Send ``inner(x)/p`` with probability ``p``, else nothing (zero):
    ``ω = (ω_inner + 1)/p − 1``; ``bits`` is the expected cost ``p·inner.bits(dim)`` and
    ``message_bits`` the realised one (``inner.bits(dim)`` for a sent row, 0 otherwise).

    The authors' CNL experiments use ``Bernoulli(1/20, RandK(1))`` (their ``C_p``).
    """

    def __init__(self, p: float, inner: Compressor | None = None) -> None:
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
            raise ValueError(f"p must be a probability in (0, 1], got {p!r}")
        if inner is not None and not isinstance(inner, Compressor):
            raise TypeError(f"inner must be a Compressor, got {type(inner).__name__}")
        self.p = float(p)
        self.inner = Identity() if inner is None else inner
        self.unbiased = self.inner.unbiased

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # the coin first (one per row), then the inner compressor on every row: the amount of
        # randomness drawn must not depend on the coins
        coin = _uniform(x[..., :1], generator) < self.p
        return torch.where(coin, self.inner(x, generator) / self.p, 0.0)

    def omega(self, dim: int) -> float:
        return (self.inner.omega(dim) + 1.0) / self.p - 1.0

    def bits(self, dim: int) -> float:
        return self.p * self.inner.bits(dim)

    def message_bits(self, out: Tensor) -> Tensor:
        sent = (out != 0).any(dim=-1).cpu()
        return torch.where(sent, self.inner.bits(out.shape[-1]), 0.0).to(torch.float64)
