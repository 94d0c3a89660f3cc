"""DINGO: distributed Newton-type method for gradient-norm optimisation (Crane & Roosta 2019)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from typing_extensions import Unpack

from ..._validation import check_number
from .. import accounting as acc
from ._common import GLMBaseline, GLMOptions

__all__ = ["DINGO", "local_solve"]


def local_solve(H: Tensor, v: Tensor) -> Tensor:
    """``H_i^† v_i`` for a batch of symmetric ``H`` ``(n, d, d)`` and ``v`` ``(n, d)``: Cholesky
    where ``H_i`` is positive definite, the pseudo-inverse on the (rare) other nodes."""
    L, info = torch.linalg.cholesky_ex(H)
    out = torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1)
    bad = (info != 0).nonzero().squeeze(1)
    if bad.numel():
        out[bad] = (torch.linalg.pinv(H[bad], hermitian=True) @ v[bad].unsqueeze(-1)).squeeze(-1)
    return out


class DINGO(GLMBaseline):
    r"""DINGO (R. Crane, F. Roosta, "DINGO: Distributed Newton-type method for gradient-norm
    optimization", NeurIPS 2019, Algorithm 1), which decreases ``‖∇P‖²``. With
    ``g = ∇P(x^k)``, ``H_i = ∇²P_i(x^k)``, ``h = (1/n) Σ_i H_i g``,
    ``H̃_i^† g̃ = (H_i² + φ²I)^{-1} H_i g`` (``H̃_i = [H_i; φI]``, ``g̃ = [g; 0]``):

    1. if ``⟨(1/n) Σ_i H_i^† g, h⟩ ≥ θ‖g‖²``: ``p = −(1/n) Σ_i H_i^† g``;
    2. else if ``⟨(1/n) Σ_i H̃_i^† g̃, h⟩ ≥ θ‖g‖²``: ``p = −(1/n) Σ_i H̃_i^† g̃``;
    3. else ``p = (1/n) Σ_i p_i``, ``p_i = −H̃_i^† g̃ − λ_i (H̃_iᵀH̃_i)^{-1} h`` with
       ``λ_i = 0`` if ``⟨H̃_i^† g̃, h⟩ ≥ θ‖g‖²``, else
       ``λ_i = (θ‖g‖² − ⟨H̃_i^† g̃, h⟩) / ⟨(H̃_iᵀH̃_i)^{-1} h, h⟩``;

    then ``x^{k+1} = x^k + α p`` with the largest ``α ∈ {1, 2⁻¹, …, 2^{−max_backtracks}}`` such
    that ``‖∇P(x^k + α p)‖² ≤ ‖g‖² + 2αρ⟨p, h⟩`` (if none passes, the smallest, counted in
    ``state["line_search_failures"]``). Islamov et al. 2021, §4, uses the DINGO paper's constants
    ``θ = 10⁻⁴``, ``φ = 10⁻⁶``, ``ρ = 10⁻⁴`` (the defaults) and ``max_backtracks = 10``.

    Communication, one ``d``-vector (``32d`` bits) per node for: ``∇P_i(x^0)`` (first iteration
    only: afterwards the accepted line-search point's gradient is the next ``g``), ``H_i g`` and
    ``H_i^† g`` (case 1), ``H̃_i^† g̃`` (case 2), ``p_i`` (case 3), and ``∇P_i`` at every
    line-search trial. The nodes recompute their local Hessians each iteration (computation,
    not communication). ``"theory"`` bills that uplink summed over the nodes; ``"authors-code"``
    one node's uplink plus the downlink as the authors' experiment code counts it, ``3·32d``
    per iteration (the server's broadcasts of ``∇P(x^k)``, ``h`` and the direction ``p``);
    ``"authors-text"`` the uplink summed over the nodes ("the total number of bits that all
    nodes send to the server", no downlink).

    Under the ``authors-*`` conventions the step is capped at ``0.01`` for the first 5
    iterations, as in the authors' experiment code (the line search then tries ``0.01`` and the
    powers of two below it); ``step_cap`` overrides this (``(cap, iterations)``, or ``None``).

    Args:
        params, features, targets, loss, lam, num_nodes, accounting: As
            :class:`~torch_rankone.distributed.baselines.DistributedNewton`.
        theta, phi, rho: DINGO's ``θ``, ``φ``, ``ρ``.
        max_backtracks: The line search tries ``α = 2^{−j}``, ``j = 0..max_backtracks``.
        step_cap: ``(cap, iterations)``: ``α ≤ cap`` in the first ``iterations`` iterations;
            default ``(0.01, 5)`` under the ``authors-*`` conventions, none under ``"theory"``.
        generator: Unused (deterministic); accepted for a uniform interface.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        *,
        theta: float = 1e-4,
        phi: float = 1e-6,
        rho: float = 1e-4,
        max_backtracks: int = 10,
        step_cap: tuple[float, int] | None | str = "default",
        **options: Unpack[GLMOptions],
    ) -> None:
        if not isinstance(max_backtracks, int) or isinstance(max_backtracks, bool):
            raise TypeError(f"max_backtracks must be an int, got {type(max_backtracks).__name__}")
        if max_backtracks < 0:
            raise ValueError(f"max_backtracks must be >= 0, got {max_backtracks}")
        rho = check_number("rho", rho, strict=True)
        if rho >= 1:
            raise ValueError(f"rho must lie in (0, 1), got {rho!r}")
        super().__init__(
            params,
            features,
            targets,
            **options,
            defaults=dict(
                theta=check_number("theta", theta, strict=True),
                phi=check_number("phi", phi, strict=True),
                rho=rho,
                max_backtracks=max_backtracks,
            ),
        )
        if step_cap == "default":
            step_cap = (0.01, 5) if self.family == "authors" else None
        if step_cap is not None:
            cap, its = step_cap
            step_cap = (check_number("step_cap[0]", cap, strict=True), int(its))
        self.step_cap = step_cap
        state = self.state[self._param]
        state["line_search_failures"] = 0
        state["cases"] = [0, 0, 0]

    def _initial_bits(self) -> dict[str, float]:
        return dict.fromkeys(acc.CONVENTIONS, 0.0)

    def _direction(self, state: dict, H: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(p, h, vectors sent)`` of cases 1–3."""
        group = self.param_groups[0]
        theta, phi = group["theta"], group["phi"]
        n = H.shape[0]
        G = g.expand(n, -1)
        Hg = (H @ g).contiguous()
        h = Hg.mean(0)
        bound = theta * g.dot(g)
        p = -local_solve(H, G).mean(0)
        if -p.dot(h) >= bound:
            state["cases"][0] += 1
            return p, h, 2
        K = H @ H
        K.diagonal(dim1=1, dim2=2).add_(phi * phi)
        q = local_solve(K, Hg)
        if q.mean(0).dot(h) >= bound:
            state["cases"][1] += 1
            return -q.mean(0), h, 3
        state["cases"][2] += 1
        Kh = local_solve(K, h.expand(n, -1).contiguous())
        qh = q @ h
        lam_i = torch.where(qh >= bound, 0.0, (bound - qh) / (Kh @ h))
        return (-q - lam_i[:, None] * Kh).mean(0), h, 4

    def _iterate(self, state: dict, x: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        group, lam, nodes = self.param_groups[0], self._lam, self.nodes
        t = nodes.margins(x)
        vectors = 0
        if "grads" not in state:
            state["grads"] = nodes.gradients(x, lam, t)
            vectors += 1
        g = state["grads"].mean(0)
        p, h, sent = self._direction(state, nodes.local_hessians(x, lam, t), g)
        vectors += sent
        g2, slope = g.dot(g), p.dot(h)
        alphas = [2.0**-j for j in range(group["max_backtracks"] + 1)]
        if self.step_cap is not None and state["step"] < self.step_cap[1]:
            cap = self.step_cap[0]
            alphas = [cap] + [a for a in alphas if a < cap]
        for alpha in alphas:
            trial = x + alpha * p
            grads = nodes.gradients(trial, lam)
            vectors += 1
            g_new = grads.mean(0)
            if g_new.dot(g_new) <= g2 + 2 * alpha * group["rho"] * slope:
                break
        else:
            state["line_search_failures"] += 1
        state["grads"] = grads
        uplink = acc.FLOAT_BITS * nodes.d * vectors
        bits = self._bill(uplink, code=uplink + 3 * acc.FLOAT_BITS * nodes.d, text=nodes.n * uplink)
        return trial, nodes.value(x, t, lam), bits
