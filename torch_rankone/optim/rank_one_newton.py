"""RankOneNewton: Newton step with a random, symmetrised rank-one Hessian estimate (seed 000).

SPEC §4.1. Each step draws ``u`` uniformly on the unit sphere of all parameters jointly, takes
one HVP ``h = H u`` and forms

    S = (N/2) (h uᵀ + u hᵀ),   D = S + δI,   x ← x − lr · (D + αI)⁻¹ ∇f(x).

``E[N H u uᵀ] = H`` (unbiased before symmetrising). ``(D + αI)⁻¹`` is a rank-2 Woodbury solve with
``U = [h, u]``, ``C = (N/2)[[0, 1], [1, 0]]``, ``c = δ + α``: two passes over the parameters,
fused with the update into one kernel (``_ext.lowrank_solve_update``) when all groups share ``lr``
and ``c``.

Reference: A. Semenov, "Rank-one approximation of the Hessian", MLO group meeting, 2025.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _ext
from .._tensorlist import TensorList, dot, norm, numel, randn_like
from ..curvature import power_iteration
from ._protocol import (
    HVP_MODES,
    SecondOrderOptimizer,
    all_finite,
    check_hyper,
    evaluate,
    split_groups,
)

__all__ = ["RankOneNewton", "rank_one_newton_direction", "theory_damping"]


def theory_damping(grad_norm: Tensor, n: int, M: float, lam_max: Tensor | float, delta: float):
    """The slides' Lemma: ``α = sqrt(M‖g‖/2) + σ``, ``σ = sqrt(λ_max² N(N−1) + Nδ²)``."""
    sigma = torch.sqrt(
        torch.as_tensor(lam_max, dtype=grad_norm.dtype) ** 2 * n * (n - 1) + n * delta**2
    )
    return torch.sqrt(M * grad_norm / 2) + sigma.to(grad_norm.device)


def _symmetrised_outer_coefficients(n: int) -> Tensor:
    """``C`` of ``S = (N/2)(h uᵀ + u hᵀ) = U C Uᵀ`` with ``U = [h, u]``."""
    return (n / 2) * torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)


def rank_one_newton_direction(
    g: TensorList, h: TensorList, u: TensorList, c: list[Tensor]
) -> tuple[TensorList, Tensor]:
    """``y = (S + Λ)⁻¹ g`` with ``S = (N/2)(h uᵀ + u hᵀ)`` and ``Λ`` diagonal, constant per tensor.

    ``c[t]`` is the diagonal value on tensor ``t``. For one shared value this is a plain rank-2
    Woodbury solve; otherwise the system is rescaled, ``(I + Λ^{-1/2} S Λ^{-1/2}) z = Λ^{-1/2} g``,
    ``y = Λ^{-1/2} z``, which is again ``c = 1`` plus rank 2. Returns ``(y, coefficients_finite)``
    — the flag is False when the ``2×2`` system or its inputs were non-finite.
    """
    C = _symmetrised_outer_coefficients(numel(g))
    if all(ci is c[0] for ci in c):
        G, b = _ext.lowrank_gram(g, [h, u])
        a = _ext.lowrank_coefficients(G, b, C, c[0])
        y = _ext._apply(g, [h, u], a, c[0])
    else:
        w = [ci.rsqrt() for ci in c]
        g_s, h_s, u_s = (torch._foreach_mul(v, w) for v in (g, h, u))
        G, b = _ext.lowrank_gram(g_s, [h_s, u_s])
        a = _ext.lowrank_coefficients(G, b, C, 1.0)
        y = torch._foreach_mul(_ext._apply(g_s, [h_s, u_s], a, 1.0), w)
    return y, all_finite(G, b, a)


class RankOneNewton(SecondOrderOptimizer):
    r"""Newton-type optimizer with a random rank-one Hessian estimate (SPEC §4.1, seed 000).

    .. math::
        u \sim \mathrm{Unif}(S^{N-1}),\quad h = \nabla^2 f(x) u,\quad
        S = \tfrac{N}{2}(h u^\top + u h^\top),\quad
        x \leftarrow x - \mathrm{lr}\,(S + (\delta + \alpha) I)^{-1} \nabla f(x)

    One HVP per step; the solve is a rank-2 Woodbury update (``O(N)``, no ``N×N`` matrix).

    Args:
        params: parameters or param groups; groups may set their own ``lr``, ``damping`` and
            ``delta`` (the diagonal ``δ + α`` is then constant per group, solved exactly).
        lr: step size (1 = the Newton step).
        damping: ``α`` for ``damping_mode="fixed"``.
        delta: ``δ``, the regulariser added to ``S`` (``D = S + δI``).
        damping_mode: ``"fixed"`` (``α = damping``) or ``"theory"``: the slides' Lemma,
            ``α_k = sqrt(M‖g_k‖/2) + σ``, ``σ = sqrt(λ_max² N(N−1) + Nδ²)`` — very conservative for
            large ``N`` (σ grows like ``N λ_max``).
        hessian_lipschitz: ``M`` (required for ``"theory"``).
        lambda_max: ``λ_max`` bound for ``"theory"``; ``None`` estimates ``|λ_max(H)|`` by power
            iteration on HVPs at the first step and every ``lambda_max_refresh`` steps (those
            steps synchronise with the host; 20 HVPs each by default).
        safeguard: ``S`` has exactly one negative eigenvalue ``μ₋ = (N/2)(h·u − ‖h‖)``, so
            ``D + αI`` is indefinite when ``c = δ + α ≤ |μ₋|`` and nearly singular just above.
            The safeguard raises ``c`` to ``max(c, |μ₋| + c/2)`` (for groups: all ``c`` by the
            shift the smallest needs), so the smallest eigenvalue is always at least ``c/2``,
            continuously in ``μ₋``; it fires when ``|μ₋| > c/2`` (counted in
            ``state["safeguard_hits"]``). Beyond the slides; ``False`` follows the formula as
            written.
        hvp: curvature source, ``"auto" | "exact" | "fd"`` (see :mod:`torch_rankone.optim`).
        generator: random source for ``u`` (default: owned, seeded from ``torch.initial_seed()``,
            saved in ``state_dict``).
        process_group: average gradients and HVPs over this group (default: the world group
            whenever ``torch.distributed`` is initialised).
        lambda_max_refresh: steps between power-iteration estimates of ``λ_max``.

    State: ``state["step"]``, ``state["skipped_steps"]`` (non-finite steps, masked on device),
    ``state["safeguard_hits"]``, ``state["damping"]`` (the last ``c = δ + α`` used, raised by the
    safeguard if it fired), ``state["lambda_max"]``.
    """

    _per_group = ("lr", "damping", "delta")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1.0,
        damping: float = 1e-3,
        delta: float = 0.0,
        damping_mode: str = "fixed",
        hessian_lipschitz: float | None = None,
        lambda_max: float | None = None,
        safeguard: bool = True,
        hvp: str = "auto",
        generator: torch.Generator | None = None,
        *,
        process_group: Any = None,
        lambda_max_refresh: int = 100,
    ) -> None:
        check_hyper("lr", lr)
        check_hyper("damping", damping)
        check_hyper("delta", delta)
        if damping_mode not in ("fixed", "theory"):
            raise ValueError(f"damping_mode must be 'fixed' or 'theory', got {damping_mode!r}")
        if damping_mode == "theory":
            if hessian_lipschitz is None:
                raise ValueError("damping_mode='theory' needs hessian_lipschitz (M)")
            check_hyper("hessian_lipschitz", hessian_lipschitz, strict=True)
        if lambda_max is not None:
            check_hyper("lambda_max", lambda_max, strict=True)
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        if not isinstance(lambda_max_refresh, int) or lambda_max_refresh < 1:
            raise ValueError(f"lambda_max_refresh must be an int >= 1, got {lambda_max_refresh}")
        defaults = dict(
            lr=lr,
            damping=damping,
            delta=delta,
            damping_mode=damping_mode,
            hessian_lipschitz=hessian_lipschitz,
            lambda_max=lambda_max,
            safeguard=safeguard,
        )
        super().__init__(params, defaults, generator=generator, process_group=process_group)
        for group in self.param_groups:
            for key in ("lr", "damping", "delta"):
                check_hyper(f"param group {key}", group[key])
            if safeguard and damping_mode == "fixed" and group["delta"] + group["damping"] <= 0:
                raise ValueError(
                    "safeguard=True needs delta + damping > 0 (the raised c keeps that value "
                    "as the smallest eigenvalue); set a positive damping or safeguard=False"
                )
        if damping_mode == "theory" and len({g["delta"] for g in self.param_groups}) > 1:
            raise ValueError("damping_mode='theory' needs the same delta in every group")
        self.hvp_mode = hvp
        self.lambda_max_refresh = lambda_max_refresh

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:
        """One RankOneNewton step; returns the loss (``None`` for graph gradients)."""
        groups = self._begin_step()
        params = [p for ps in groups for p in ps]
        if not params:
            return None
        self._sync_generator()
        self._call = self._next_call()
        ev = evaluate(params, closure, self.hvp_mode)
        g, loss = self._average_with_loss(ev.grads, ev.loss)
        z = randn_like(params, self.generator)
        u = torch._foreach_div(z, norm(z))
        h = self._average(ev.hvp_fn(u))
        n = numel(params)
        defaults = self.param_groups[0]
        c_groups = self._shifts(g, n, ev, defaults)

        # Safeguard: S's only negative eigenvalue is μ₋ = (N/2)(h·u − ‖h‖‖u‖), ‖u‖ = 1. Raise
        # every c by the same shift so that the smallest c becomes max(c, |μ₋| + c/2): the
        # smallest eigenvalue of D + αI is then at least c/2 — continuous in μ₋, unlike a jump
        # at c = |μ₋|, which leaves c − |μ₋| ≈ 0 just above it.
        mu_minus = (n / 2) * (dot(h, u) - norm(h))
        if defaults["safeguard"]:
            c_min = torch.stack(c_groups).min()
            shift = (-mu_minus - c_min / 2).clamp_min(0.0)
            shifted = {id(c): c + shift for c in c_groups}  # keeps shared values shared
            c_groups = [shifted[id(c)] for c in c_groups]
            self._counter("safeguard_hits", params[0]).add_((shift > 0).to(torch.int64))
        finite = all_finite(loss, torch.stack(c_groups))
        lr = self._shared_lr(groups)
        if lr is not None and all(c is c_groups[0] for c in c_groups):
            # One c and one lr: the fused solve-and-update (one reduction pass, one update pass).
            # lr = NaN vetoes the step on device when the loss or c is not finite.
            lr = torch.where(finite, torch.as_tensor(lr, dtype=torch.float64), torch.nan)
            C = _symmetrised_outer_coefficients(n)
            ok = _ext.lowrank_solve_update(params, g, [h, u], C, c_groups[0], lr.to(g[0].device))
            self._count_step(ok, params[0])
        else:
            c_tensors = [c for c, ps in zip(c_groups, groups) for _ in ps]
            y, solved = rank_one_newton_direction(g, h, u, c_tensors)
            self._apply_masked(groups, split_groups(y, groups), solved & finite)
        self.state["damping"] = c_groups[0].detach()
        self._detach_grads(params, g)
        return loss

    def _shifts(self, g: TensorList, n: int, ev, defaults: dict) -> list[Tensor]:
        """``c = δ + α`` per group, as 0-d tensors on the parameters' device (no host sync)."""
        device, dtype = g[0].device, g[0].dtype
        if defaults["damping_mode"] == "fixed":
            cache = {}
            return [
                cache.setdefault(
                    group["delta"] + group["damping"],
                    torch.tensor(group["delta"] + group["damping"], dtype=dtype, device=device),
                )
                for group in self.param_groups
            ]
        lam = defaults["lambda_max"]
        if lam is None:
            lam = self._estimated_lambda_max(ev, g)
        alpha = theory_damping(norm(g), n, defaults["hessian_lipschitz"], lam, defaults["delta"])
        c = alpha + defaults["delta"]
        return [c] * len(self.param_groups)

    def _estimated_lambda_max(self, ev, like: TensorList) -> Tensor:
        """``|λ_max(H)|`` by 20 power iterations, at the first call and every
        ``lambda_max_refresh`` calls (those steps synchronise with the host)."""
        if "lambda_max" not in self.state or self._call % self.lambda_max_refresh == 0:
            res = power_iteration(
                lambda v: self._average(ev.hvp_fn(v)),
                like,
                max_iters=20,
                tol=1e-3,
                generator=self.generator,
                warn=False,
            )
            self.state["lambda_max"] = res.eigenvalue.abs().to(like[0].device)
        return self.state["lambda_max"]
