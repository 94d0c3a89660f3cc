"""Communication accounting for NewtonLearn: the bits the nodes send the server.

Two conventions:

``"realistic"`` (default; Islamov et al. 2021, §4, "the realistic setting": the server does
not hold the data, Option 1) counts the total over **all nodes**. Per iteration and node ``i``:

* the local gradient ``∇f_i(x^k)``: ``32d``;
* the compressed learning message ``C(h_i(x^k) − h_i^k)``: ``compressor.message_bits`` (values
  and indices, e.g. ``32r + log2 C(m, r)`` for RandK(r));
* Option 1 only: ``32d`` for every transmitted ``a_ij``, i.e. every ``j`` with
  ``h_ij^{k+1} ≠ h_ij^k`` (Algorithm 1/2, "Send {a_ij : h_ij^{k+1} − h_ij^k ≠ 0}");
* NL2 and CNL: ``32`` for ``β_i^k``.

Initialisation (the server needs the Hessian model at ``x^0``): with Option 1 each node sends its
local ``d×d`` symmetric matrices, ``32·d(d+1)/2`` each — one for NL1 (``H_i^0``), two for NL2 and
CNL (``A_i^0`` and ``(1/m) Σ_j a_ij a_ijᵀ``, the ``2γ`` shift); with Option 2 the server holds the
data and each node sends only ``h_i^0``, ``32m``.

``"paper"`` reproduces the count of the authors' reference code, which is **one node's uplink**
(not the sum over nodes) and has no index bits: per iteration ``32(d + rd + r)`` for NL1 with
RandK(r) (Identity: ``r = m``), ``+32`` for NL2/CNL's β; initialisation ``32·d(d+1)/2``;
Newton ``32(d² + d)`` per iteration.
"""

from __future__ import annotations

from .compressors import Compressor, Identity, RandK, TopK

__all__ = ["ACCOUNTINGS", "FLOAT_BITS", "init_bits", "paper_iteration_bits", "newton_bits"]

ACCOUNTINGS = ("realistic", "paper")
FLOAT_BITS = 32


def symmetric_matrix_bits(d: int) -> float:
    """A symmetric ``d×d`` matrix as its upper triangle of 32-bit floats."""
    return FLOAT_BITS * d * (d + 1) / 2


def init_bits(accounting: str, variant: str, option: int, num_nodes: int, m: int, d: int) -> float:
    """Bits sent before the first iteration (see the module docstring)."""
    if accounting == "paper":
        return symmetric_matrix_bits(d)
    if option == 2:
        return float(num_nodes * FLOAT_BITS * m)
    matrices = 1 if variant == "nl1" else 2
    return num_nodes * matrices * symmetric_matrix_bits(d)


def paper_r(compressor: Compressor, m: int) -> int:
    """The ``r`` of the authors' count: RandK/TopK's ``r``, ``m`` for Identity."""
    if isinstance(compressor, (RandK, TopK)):
        return compressor.r
    if isinstance(compressor, Identity):
        return m
    raise ValueError(
        "accounting='paper' reproduces the authors' count for RandK, TopK and Identity only, "
        f"got compressor={compressor!r}; use accounting='realistic'"
    )


def paper_iteration_bits(variant: str, compressor: Compressor, m: int, d: int) -> float:
    """One node's bits per iteration in the authors' convention."""
    r = paper_r(compressor, m)
    return FLOAT_BITS * (d + r * d + r) + (0 if variant == "nl1" else FLOAT_BITS)


def newton_bits(d: int) -> float:
    """Exact Newton, one node per iteration (authors' convention): Hessian and gradient."""
    return float(FLOAT_BITS * (d * d + d))


def realistic_iteration_bits(
    variant: str, option: int, num_nodes: int, d: int, message_bits: float, sent_rows: float
) -> float:
    """All nodes' bits in one iteration, realistic convention: ``message_bits`` is the sum of the
    compressed messages' costs and ``sent_rows`` the number of ``a_ij`` transmitted (Option 1)."""
    bits = num_nodes * FLOAT_BITS * d + message_bits
    if option == 1:
        bits += FLOAT_BITS * d * sent_rows
    if variant != "nl1":
        bits += num_nodes * FLOAT_BITS
    return float(bits)
