"""Communication accounting for NewtonLearn and its baselines: three declared conventions.

Reference: R. Islamov, X. Qian, P. Richtárik, "Distributed second order methods with fast rates
and compressed communication", ICML 2021, §4. Where the paper's text and the authors' published
experiment code count differently, both are available, and every figure and table names the
convention it uses.

``"theory"`` (default). The bits every node sends the server, summed over **all nodes**, with
each algorithm as its analysis states it (theoretical constants, ``L = max_i L_i``; the
baselines' parameters are the theory's, so the iterates of DCGD, DIANA, ADIANA and DINGO depend
on the convention family). Per iteration and node ``i`` for NewtonLearn:

* the local gradient ``∇f_i(x^k)``: ``32d``;
* the compressed learning message ``C(h_i(x^k) − h_i^k)``: ``compressor.message_bits`` (values
  and indices, e.g. ``32r + log2 C(m, r)`` for RandK(r));
* Option 1 only: ``32d`` for every transmitted ``a_ij``, i.e. every ``j`` with
  ``h_ij^{k+1} ≠ h_ij^k`` (Algorithm 1/2, "Send {a_ij : h_ij^{k+1} − h_ij^k ≠ 0}");
* NL2 and CNL: ``32`` for ``β_i^k``.

Initialisation: with Option 1 each node sends its local ``d×d`` symmetric matrices,
``32·d(d+1)/2`` each — one for NL1, two for NL2 and CNL (``A_i^0`` and the ``2γ`` shift's
``(1/m) Σ_j a_ij a_ijᵀ``); with Option 2 each node sends ``h_i^0``, ``32m``. The baselines bill
every message the algorithm sends (ADIANA: two compressed vectors per iteration, DINGO: every
uplink vector, line-search gradients included) at the compressor's own ``message_bits``.

``"authors-code"``. One node's uplink, as the authors' published experiment code counts it,
with the constants and stepsizes of that code (:func:`convention_family` is ``"authors"``):
NL ``32(d + rd + r)`` per iteration (RandK(r) over the ``m`` coefficients, no index bits;
``+32`` for NL2/CNL's β), initialisation ``32·d(d+1)/2``; Newton ``32(d² + d)``; the first-order
baselines one compressed ``d``-vector per iteration at the paper's per-message costs
(:func:`published_message_bits`: ``32r + log2 C(d, r)``, ``2.8d + 32``, ``9d``) — **ADIANA
included: one vector, although the algorithm compresses two**; DINGO its uplink plus the
downlink ``3·32d`` per iteration (the broadcasts of ``∇P(x^k)``, ``h^k`` and the direction).

``"authors-text"``. What the paper's text states: "communicated bits refers to the total number
of bits that all nodes send to the server" — ``n`` times a node's uplink, index bits included
(NL: ``32(d + rd + r) + log2 C(m, r)`` per node and iteration; DINGO: no downlink). Same
iterates as ``"authors-code"`` (same constants); only the bill differs.

Former names, still accepted: ``"realistic"`` is ``"theory"`` and ``"paper"`` is
``"authors-code"`` (which since corrects ADIANA to one vector, adds DINGO's downlink and uses
the authors' stepsizes).
"""

from __future__ import annotations

from .compressors import (
    Bernoulli,
    Compressor,
    Identity,
    RandK,
    RandomDithering,
    TopK,
    log2_binomial,
)

__all__ = [
    "ACCOUNTINGS",
    "ALIASES",
    "CONVENTIONS",
    "FLOAT_BITS",
    "canonical",
    "convention_family",
    "init_bits",
    "newton_bits",
    "nl_authors_iteration_bits",
    "paper_iteration_bits",
    "published_message_bits",
]

#: The declared conventions.
CONVENTIONS = ("theory", "authors-code", "authors-text")
#: Former names: ``"realistic"`` → ``"theory"``, ``"paper"`` → ``"authors-code"``.
ALIASES = {"realistic": "theory", "paper": "authors-code"}
#: Every accepted value of ``accounting``.
ACCOUNTINGS = CONVENTIONS + tuple(ALIASES)
FLOAT_BITS = 32


def canonical(accounting: str) -> str:
    """The declared name of ``accounting`` (aliases resolved); ``ValueError`` if unknown."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(
            f"accounting must be one of {CONVENTIONS} (former names {tuple(ALIASES)} map to "
            f"{tuple(ALIASES.values())}), got {accounting!r}"
        )
    return ALIASES.get(accounting, accounting)


def convention_family(accounting: str) -> str:
    """``"theory"`` or ``"authors"``: which constants and stepsizes the baselines use (the
    two ``authors-*`` conventions share their iterates)."""
    return "theory" if canonical(accounting) == "theory" else "authors"


def symmetric_matrix_bits(d: int) -> float:
    """A symmetric ``d×d`` matrix as its upper triangle of 32-bit floats."""
    return FLOAT_BITS * d * (d + 1) / 2


def init_bits(accounting: str, variant: str, option: int, num_nodes: int, m: int, d: int) -> float:
    """NewtonLearn's bits before the first iteration (see the module docstring)."""
    conv = canonical(accounting)
    if conv == "authors-code":
        return symmetric_matrix_bits(d)
    if conv == "authors-text":
        return num_nodes * symmetric_matrix_bits(d)
    if option == 2:
        return float(num_nodes * FLOAT_BITS * m)
    matrices = 1 if variant == "nl1" else 2
    return num_nodes * matrices * symmetric_matrix_bits(d)


def paper_r(compressor: Compressor, m: int, accounting: str = "authors-code") -> int:
    """The ``r`` of the authors' count: RandK/TopK's ``r`` (the inner one for ``Bernoulli``),
    ``m`` for Identity."""
    inner = compressor.inner if isinstance(compressor, Bernoulli) else compressor
    if isinstance(inner, (RandK, TopK)):
        return inner.r
    if isinstance(inner, Identity):
        return m
    raise ValueError(
        f"accounting={accounting!r} reproduces the authors' count for RandK, TopK, Identity "
        f"and Bernoulli of those only, got compressor={compressor!r}; use accounting='theory'"
    )


def nl_authors_iteration_bits(
    accounting: str, variant: str, compressor: Compressor, m: int, d: int, num_nodes: int = 1
) -> float:
    """NewtonLearn's bits per iteration in an ``authors-*`` convention: one node's
    ``32(d + rd + r)`` (+32 for β) for ``"authors-code"``; ``num_nodes`` times that plus the
    index bits ``log2 C(m, r)`` per node for ``"authors-text"``. For ``Bernoulli(p, RandK(r))``
    (the paper's ``C_p``) the message is billed at its expected cost, ``p`` times RandK's."""
    conv = canonical(accounting)
    r = paper_r(compressor, m, accounting)
    p = compressor.p if isinstance(compressor, Bernoulli) else 1.0
    beta = 0 if variant == "nl1" else FLOAT_BITS
    if conv == "authors-code":
        return FLOAT_BITS * d + p * FLOAT_BITS * (r * d + r) + beta
    if conv == "authors-text":
        index = log2_binomial(m, r) if r < m else 0.0
        return num_nodes * (FLOAT_BITS * d + p * (FLOAT_BITS * (r * d + r) + index) + beta)
    raise ValueError(f"not an authors-* convention: {accounting!r}")


def paper_iteration_bits(variant: str, compressor: Compressor, m: int, d: int) -> float:
    """One node's bits per iteration in the authors' code's convention (former name)."""
    return nl_authors_iteration_bits("authors-code", variant, compressor, m, d)


def newton_bits(d: int) -> float:
    """Exact Newton, one node per iteration (authors' count): Hessian and gradient."""
    return float(FLOAT_BITS * (d * d + d))


def published_message_bits(compressor: Compressor, dim: int) -> float:
    """One compressed ``dim``-vector at the paper's per-message cost (§4, "Compression
    operators"): ``32r + log2 C(dim, r)`` for random-r sparsification, ``2.8·dim + 32`` for
    random dithering with ``s = √dim``, ``9·dim`` for natural compression; the compressor's
    own ``bits`` otherwise (``32·dim`` for Identity)."""
    if isinstance(compressor, RandomDithering):
        return 2.8 * dim + FLOAT_BITS
    return float(compressor.bits(dim))


def realistic_iteration_bits(
    variant: str, option: int, num_nodes: int, d: int, message_bits: float, sent_rows: float
) -> float:
    """All nodes' bits in one iteration, ``"theory"`` convention: ``message_bits`` is the sum of
    the compressed messages' costs and ``sent_rows`` the number of ``a_ij`` transmitted
    (Option 1)."""
    bits = num_nodes * FLOAT_BITS * d + message_bits
    if option == 1:
        bits += FLOAT_BITS * d * sent_rows
    if variant != "nl1":
        bits += num_nodes * FLOAT_BITS
    return float(bits)
