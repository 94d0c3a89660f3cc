"""First-order baselines with compressed gradients: DCGD, DIANA, ADIANA (Islamov et al. 2021, §4).

Every node compresses a ``d``-vector per message with a fresh draw of an unbiased compressor
``C`` of variance ``ω`` (``E C(v) = v``, ``E‖C(v)‖² ≤ (ω+1)‖v‖²``); the server holds no data and
averages. The stepsizes default to the theoretical ones, as in the paper's experiments ("we use
the theoretical parameters (e.g., stepsizes) for all the three algorithms"), with ``L`` the
smoothness constant of every local function ``P_i`` and ``μ = λ`` its strong convexity
(:func:`~torch_rankone.distributed.baselines._common.smoothness`):

* DCGD: ``γ = 1 / (L (1 + 2ω/n))``;
* DIANA: ``α = 1/(ω + 1)``, ``γ = 1 / (L (1 + 6ω/n))``;
* ADIANA: see :func:`adiana_parameters`.

The DCGD and DIANA constants are the ``γ ≤ 1/(A + CM)`` conditions of the unified analysis of
Gorbunov, Hanzely and Richtárik (AISTATS 2020, Table 2 and §A) for ``L_i ≤ L``. These are the
``accounting="theory"`` choices. Under ``"authors-code"``/``"authors-text"`` the constants are
those of the authors' published experiment code (Islamov, Qian, Richtárik, ICML 2021), with
``L`` the smoothness of the *global* data term
(:func:`~torch_rankone.distributed.baselines._common.global_smoothness`, no ``λ``):

* DCGD: ``γ = 1/L``;
* DIANA: ``α = 1/(ω + 1)``, ``γ = min(α/(2λ), 2/((L + λ)(1 + 6ω/n)))``;
* ADIANA: :func:`adiana_parameters` with ``L + λ`` and ``μ = λ``.

With other stepsizes the iterates differ: a run belongs to its convention family.

Bits per iteration: ``"theory"`` sums every node's messages at the compressor's
``message_bits`` (ADIANA: both of its compressed vectors); ``"authors-code"`` bills one node's
single vector at the paper's per-message cost
(:func:`~torch_rankone.distributed.accounting.published_message_bits`: ``32r + log2 C(d, r)``,
``2.8d + 32``, ``9d``) — ADIANA included, as the authors' code bills it; ``"authors-text"`` is
``n`` times that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor
from typing_extensions import Unpack

from ..._validation import check_number
from .. import accounting as acc
from ..compressors import Compressor
from ._common import GLMBaseline, GLMOptions, global_smoothness, smoothness

__all__ = [
    "DCGD",
    "DIANA",
    "ADIANA",
    "ADIANAParameters",
    "adiana_parameters",
    "authors_dcgd_stepsize",
    "authors_diana_parameters",
    "dcgd_stepsize",
    "diana_parameters",
]


def dcgd_stepsize(L: float, omega: float, n: int) -> float:
    """DCGD's theoretical stepsize ``1 / (L (1 + 2ω/n))`` (Khirirat, Feyzmahdavian and
    Johansson 2018; constants of Gorbunov et al. 2020)."""
    return 1.0 / (L * (1.0 + 2.0 * omega / n))


def diana_parameters(L: float, omega: float, n: int) -> tuple[float, float]:
    """DIANA's theoretical ``(α, γ) = (1/(ω+1), 1/(L (1 + 6ω/n)))`` (Mishchenko et al. 2019;
    Horváth et al. 2019; constants of Gorbunov et al. 2020)."""
    return 1.0 / (omega + 1.0), 1.0 / (L * (1.0 + 6.0 * omega / n))


def authors_dcgd_stepsize(L: float) -> float:
    """DCGD's stepsize in the authors' experiment code: ``1/L`` (``L`` of the global data
    term)."""
    return 1.0 / L


def authors_diana_parameters(L: float, lam: float, omega: float, n: int) -> tuple[float, float]:
    """DIANA's ``(α, γ)`` in the authors' experiment code: ``α = 1/(ω + 1)``,
    ``γ = min(α/(2λ), 2/((L + λ)(1 + 6ω/n)))`` (``L`` of the global data term)."""
    alpha = 1.0 / (omega + 1.0)
    gamma = 2.0 / ((L + lam) * (1.0 + 6.0 * omega / n))
    if lam > 0:
        gamma = min(alpha / (2.0 * lam), gamma)
    return alpha, gamma


class ADIANAParameters(NamedTuple):
    """ADIANA's parameters (Li, Kovalev, Qian, Richtárik 2020, Algorithm 2)."""

    alpha: float
    p: float
    eta: float
    theta1: float
    theta2: float
    gamma: float
    beta: float


def adiana_parameters(L: float, mu: float, omega: float, n: int) -> ADIANAParameters:
    r"""ADIANA's theoretical parameters (Li et al. 2020, Theorem 4 and Corollary 3):

    .. math::
        \alpha = \frac{1}{1+\omega},\quad
        p = \min\Bigl\{1, \frac{\max\{1, \sqrt{n/(32\omega)} - 1\}}{2(1+\omega)}\Bigr\},\quad
        \eta = \min\Bigl\{\frac{1}{2L}, \frac{n}{64\,\omega\,(2p(\omega+1)+1)^2 L}\Bigr\},

    .. math::
        \theta_1 = \min\Bigl\{\frac14, \sqrt{\eta\mu/p}\Bigr\},\quad \theta_2 = \frac12,\quad
        \gamma = \frac{\eta}{2(\theta_1 + \eta\mu)},\quad \beta = 1 - \gamma\mu.

    ``ω = 0`` (no compression) gives ``p = 1``, ``η = 1/(2L)``.
    """
    if omega == 0:
        p, eta = 1.0, 1.0 / (2.0 * L)
    else:
        p = min(1.0, max(1.0, math.sqrt(n / (32.0 * omega)) - 1.0) / (2.0 * (1.0 + omega)))
        eta = min(1.0 / (2.0 * L), n / (64.0 * omega * (2.0 * p * (omega + 1.0) + 1.0) ** 2 * L))
    theta1 = min(0.25, math.sqrt(eta * mu / p))
    gamma = eta / (2.0 * (theta1 + eta * mu))
    return ADIANAParameters(1.0 / (1.0 + omega), p, eta, theta1, 0.5, gamma, 1.0 - gamma * mu)


class _CompressedGradient(GLMBaseline):
    """Shell of the compressed-gradient methods: the compressor, its ``ω`` for ``d``-vectors,
    the theoretical ``L`` and ``μ``, and the message bill."""

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        *,
        compressor: Compressor,
        **options: Unpack[GLMOptions],
    ) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a Compressor, got {type(compressor).__name__}")
        if not compressor.unbiased:
            raise ValueError(
                f"{type(self).__name__} needs an unbiased compressor (its theory and stepsizes "
                f"assume E C(v) = v), got {compressor!r}"
            )
        self.compressor = compressor
        super().__init__(params, features, targets, defaults={}, **options)
        self.omega = compressor.omega(self.nodes.d)

    def _initial_bits(self) -> dict[str, float]:
        return dict.fromkeys(acc.CONVENTIONS, 0.0)  # the shifts start at 0, x^0 known to all

    def _constants(self) -> tuple[float, float]:
        """``(L, μ)``: theory ``(max_i L_i, λ)``; authors ``(L of the global data term, λ)``."""
        if self.family == "authors":
            return global_smoothness(self.nodes), self._lam
        return smoothness(self.nodes, self._lam)

    def _send(self, v: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Every node's message ``C(v_i)`` (a fresh draw per row) and the bits they cost."""
        out = self.compressor(v, self.generator)
        published = acc.published_message_bits(self.compressor, self.nodes.d)
        return out, {
            "theory": float(self.compressor.message_bits(out).sum()),
            "authors-code": published,
            "authors-text": self.nodes.n * published,
        }


class DCGD(_CompressedGradient):
    r"""Distributed compressed gradient descent (Khirirat, Feyzmahdavian, Johansson 2018):

    .. math::
        x^{k+1} = x^k - \gamma \frac1n \sum_i C_i^k\bigl(\nabla P_i(x^k)\bigr),\qquad
        \gamma = \frac{1}{L(1 + 2\omega/n)}.

    With ``ω > 0`` it converges linearly only to a neighbourhood of ``x*`` whose size grows
    with ``γ ω/n² Σ_i ‖∇P_i(x*)‖²`` — the reason for DIANA. One compressed ``d``-vector per node
    and iteration.

    Args:
        params, features, targets, loss, lam, num_nodes, accounting: As
            :class:`~torch_rankone.distributed.baselines.DistributedNewton`.
        compressor: Unbiased gradient compressor (the paper's: ``RandK(d // 4)``,
            ``RandomDithering(round(√d))``, ``NaturalCompression()``).
        lr: ``γ``; default the theoretical value above.
        generator: Source of the compressors' randomness.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        compressor: Compressor,
        *,
        lr: float | None = None,
        **options: Unpack[GLMOptions],
    ) -> None:
        super().__init__(params, features, targets, compressor=compressor, **options)
        if lr is None:
            L = self._constants()[0]
            lr = (
                authors_dcgd_stepsize(L)
                if self.family == "authors"
                else dcgd_stepsize(L, self.omega, self.nodes.n)
            )
        self.lr = check_number("lr", lr, strict=True)

    def _iterate(self, state: dict, x: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        t = self.nodes.margins(x)
        messages, bits = self._send(self.nodes.gradients(x, self._lam, t))
        return x - self.lr * messages.mean(0), self.nodes.value(x, t, self._lam), bits


class DIANA(_CompressedGradient):
    r"""DIANA: compressed gradient *differences* against learned shifts (Mishchenko, Gorbunov,
    Takáč, Richtárik 2019; Horváth et al. 2019):

    .. math::
        \Delta_i^k = C_i^k\bigl(\nabla P_i(x^k) - h_i^k\bigr),\quad
        g^k = h^k + \frac1n\sum_i \Delta_i^k,\quad x^{k+1} = x^k - \gamma g^k,

    .. math::
        h_i^{k+1} = h_i^k + \alpha \Delta_i^k,\quad h^{k+1} = \frac1n\sum_i h_i^{k+1},\qquad
        \alpha = \frac{1}{\omega+1},\ \gamma = \frac{1}{L(1 + 6\omega/n)},

    ``h_i^0 = 0``. The shifts learn ``∇P_i(x*)``, so the compression noise vanishes at the
    optimum and the method converges linearly to ``x*``. One compressed ``d``-vector per node
    and iteration; the server keeps ``h^k`` itself.

    Args:
        As :class:`DCGD`; ``alpha`` overrides ``α``.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        compressor: Compressor,
        *,
        lr: float | None = None,
        alpha: float | None = None,
        **options: Unpack[GLMOptions],
    ) -> None:
        super().__init__(params, features, targets, compressor=compressor, **options)
        L, n = self._constants()[0], self.nodes.n
        alpha_th, lr_th = (
            authors_diana_parameters(L, self._lam, self.omega, n)
            if self.family == "authors"
            else diana_parameters(L, self.omega, n)
        )
        self.lr = check_number("lr", lr_th if lr is None else lr, strict=True)
        self.alpha = check_number("alpha", alpha_th if alpha is None else alpha, strict=True)
        x = self._param
        self.state[x]["shifts"] = x.new_zeros(self.nodes.n, self.nodes.d)

    def _iterate(self, state: dict, x: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        t = self.nodes.margins(x)
        shifts = state["shifts"]
        delta, bits = self._send(self.nodes.gradients(x, self._lam, t) - shifts)
        g = (shifts + delta).mean(0)
        shifts.add_(delta, alpha=self.alpha)
        return x - self.lr * g, self.nodes.value(x, t, self._lam), bits


class ADIANA(_CompressedGradient):
    r"""ADIANA: accelerated DIANA (Li, Kovalev, Qian, Richtárik, ICML 2020, Algorithm 2):

    .. math::
        x^k = \theta_1 z^k + \theta_2 w^k + (1 - \theta_1 - \theta_2) y^k,

    .. math::
        g^k = h^k + \frac1n \sum_i C_i^k\bigl(\nabla P_i(x^k) - h_i^k\bigr),\quad
        h_i^{k+1} = h_i^k + \alpha\, \tilde C_i^k\bigl(\nabla P_i(w^k) - h_i^k\bigr),

    .. math::
        y^{k+1} = x^k - \eta g^k,\quad
        z^{k+1} = \beta z^k + (1-\beta) x^k + \frac{\gamma}{\eta}(y^{k+1} - x^k),\quad
        w^{k+1} = \begin{cases} y^k & \text{with probability } p\\ w^k & \text{otherwise,}
        \end{cases}

    with the theoretical parameters of :func:`adiana_parameters`, ``y^0 = z^0 = w^0 = x^0``,
    ``h_i^0 = 0``. Two compressed ``d``-vectors per node and iteration (``C`` and ``C̃`` are
    independent draws, drawn in that order, then the coin for ``w``): ``"theory"`` bills both,
    the ``authors-*`` conventions one, as the authors' experiment code does. The parameter holds
    ``y^k``, the sequence the theory's Lyapunov function measures, and the history records
    ``P(y^k)``.

    Args:
        As :class:`DCGD` (no ``lr``: every parameter is the theoretical one).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        compressor: Compressor,
        **options: Unpack[GLMOptions],
    ) -> None:
        super().__init__(params, features, targets, compressor=compressor, **options)
        L, mu = self._constants()
        if mu <= 0:
            raise ValueError("ADIANA's theoretical parameters need lam > 0 (strong convexity)")
        if self.family == "authors":
            L = L + mu  # the smoothness of P = f + (λ/2)‖x‖²
        self.constants = adiana_parameters(L, mu, self.omega, self.nodes.n)
        y = self._param.detach().reshape(-1)
        state = self.state[self._param]
        state["z"], state["w"] = y.clone(), y.clone()
        state["shifts"] = y.new_zeros(self.nodes.n, self.nodes.d)

    def _iterate(self, state: dict, y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        c, lam, nodes = self.constants, self._lam, self.nodes
        z, w, shifts = state["z"], state["w"], state["shifts"]
        x = c.theta1 * z + c.theta2 * w + (1.0 - c.theta1 - c.theta2) * y
        delta_x, bits_x = self._send(nodes.gradients(x, lam) - shifts)
        delta_w, bits_w = self._send(nodes.gradients(w, lam) - shifts)
        g = (shifts + delta_x).mean(0)
        shifts.add_(delta_w, alpha=c.alpha)
        y_new = x - c.eta * g
        state["z"] = c.beta * z + (1.0 - c.beta) * x + (c.gamma / c.eta) * (y_new - x)
        # The coin is drawn on the generator's device (a CUDA generator cannot draw on the CPU)
        # and applied without reading it back to the host.
        gen = self.generator
        coin = torch.rand((), generator=gen, dtype=torch.float64, device=gen.device)
        state["w"] = torch.where(coin.to(y.device) < c.p, y, w)
        # theory: both compressed vectors; authors-*: one, as the authors' code bills ADIANA
        bits = {key: bits_x[key] + (bits_w[key] if key == "theory" else 0.0) for key in bits_x}
        return y_new, nodes.value(y, lam=lam), bits
