"""NeumannIHVP: Newton-type step with the inverse Hessian applied by a truncated Neumann series.

With ``A = (H + λI)/s`` and ``K = num_terms``,

    y = (1/s) Σ_{j=0..K} (I − A)^j g,     x ← x − lr · y,

exactly ``K`` HVPs per step (:func:`torch_rankone.linalg.neumann_series`). The series converges
for ``H + λI`` positive definite and ``s > λ_max(H + λI)``; ``s`` is given or estimated by power
iteration (``1.05·|λ_max(H + λI)|``) and refreshed every ``scale_refresh`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._validation import check_int, check_number
from ..curvature import power_iteration
from ..linalg import neumann_series
from ._protocol import (
    SecondOrderOptimizer,
    StepOptions,
    all_finite,
    check_update_extras,
    split_groups,
)

__all__ = ["NeumannIHVP"]

_DEFAULT_RELATIVE_DAMPING = 1.0


class NeumannIHVP(SecondOrderOptimizer):
    r"""Newton-type optimizer with a truncated Neumann-series inverse Hessian.

    .. math::
        y = \frac1s \sum_{j=0}^{K} \Bigl(I - \frac{H + \lambda I}{s}\Bigr)^j \hat m,
        \qquad x \leftarrow x - \mathrm{lr}\, y

    (Agarwal, Bullins & Hazan, "Second-order stochastic optimization for machine learning in
    linear time", JMLR 2017; Koh & Liang, 2017): ``y ≈ (H + λI)⁻¹ m̂``, ``lr = 1`` is the damped
    Newton step. The series converges for ``H + λI`` positive definite and
    ``s > λ_max(H + λI)/2``. ``m̂`` is the gradient, or its bias-corrected average with
    ``momentum > 0``.

    ``damping_mode="relative"`` (default): ``ŝ = 1.5·|λ_max(H)|`` by power iteration (a margin
    for the variation of mini-batch curvature), ``λ = damping · ŝ`` and ``s = ŝ + λ``. The step
    is then scale-free: along the top eigenvector it is at most ``lr·g/λ_max``, along directions
    of little curvature ``≈ lr·(1 − (1 − λ/s)^{K+1})·g/λ`` (gradient descent with a step
    ``∝ 1/λ_max``), and ``H`` may have negative eigenvalues down to ``−λ`` before the series
    diverges. ``damping_mode="fixed"``: ``λ = damping`` (absolute) and ``s`` = ``scale`` or
    ``1.05·|λ_max(H + λI)|`` — the series as written.

    Tuning rule: start from the defaults; divide ``lr`` by 3 if the loss is noisy or rises,
    multiply it by 3 if it falls steadily but slowly; ``damping`` is relative (dimensionless):
    lower it for more curvature correction, raise it if fallbacks are reported.

    Args:
        lr: step size (per group; default 1, the damped Newton step).
        damping: relative (default 1) or absolute ``λ`` (``damping_mode="fixed"``, default 0).
        num_terms: ``K``, HVPs per step.
        scale: ``s`` (fixed mode only); ``None`` estimates it by power iteration (20 HVPs, host
            synchronisation) at the first step and every ``scale_refresh`` steps.
        hvp: curvature source ``"auto" | "exact" | "fd"`` (as for :class:`RankOneNewton`).
        damping_mode: ``"relative"`` or ``"fixed"``.
        momentum: ``β`` of the bias-corrected gradient average (default 0).
        weight_decay: decoupled weight decay (AdamW).
        process_group, module, grads_synced: as in :class:`RankOneNewton` (data parallelism:
            ``docs/scaling.md``); ``module``: buffers advance once per step under finite
            differences.

    State (:attr:`global_state`, :meth:`counters`): ``"step"``, ``"skipped_steps"``,
    ``"neumann_fallbacks"``, ``"scale"`` (the estimated ``s``; NaN before the first step).

    Divergence (a Rayleigh quotient of ``A = (H + λI)/s`` outside ``(0, 2)`` along the series'
    iterates — the series converges while ``A``'s eigenvalues lie there —, a growing term, or a
    non-finite value) is detected on device; that step falls back to the damped gradient step
    ``y = g/s'``, ``s' = s·max(1, r)`` with ``r`` the largest Rayleigh quotient seen (which proves
    ``λ_max(H + λI) ≥ r·s``: a too-small ``s`` does not make the fallback diverge), and the
    ``neumann_fallbacks`` counter counts it. With an
    estimated scale, a quotient ``r > 1`` also raises ``s`` to ``1.05·r·s`` for the following
    steps (on device; the curvature grew since the last estimate). Fallbacks on most steps and
    skipped steps are reported by a ``RuntimeWarning`` at the sync points of
    :meth:`SecondOrderOptimizer._check_health` (calls 1, 2, 4, …, then every ``scale_refresh``).

    Example (least squares: the Hessian is ``2AᵀA/m``, and each step takes a damped Newton step;
    the closure computes the loss, the optimizer its gradient and HVPs):
        >>> import torch
        >>> from torch_rankone import NeumannIHVP
        >>> gen = torch.Generator().manual_seed(0)
        >>> A = torch.randn(64, 4, generator=gen)
        >>> b = A @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        >>> w = torch.zeros(4, requires_grad=True)
        >>> opt = NeumannIHVP([w])
        >>> for _ in range(20):
        ...     loss = opt.step(lambda: ((A @ w - b) ** 2).mean())
        >>> torch.round(w.detach(), decimals=2)
        tensor([ 1.0000, -2.0000,  0.5000,  3.0000])
    """

    _per_group = ("lr", "momentum", "weight_decay")
    _global_floats = ("scale",)
    _health_counters = {
        **SecondOrderOptimizer._health_counters,
        "neumann_fallbacks": (
            "the Neumann series diverged and the step fell back to the damped gradient step",
            "raise damping (H + λI must be positive definite); with a given scale, raise it "
            "(s > λ_max(H + λI)/2) or leave scale=None to estimate it",
        ),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1.0,
        damping: float | None = None,
        num_terms: int = 10,
        scale: float | None = None,
        scale_refresh: int = 100,
        hvp: str = "auto",
        *,
        damping_mode: str = "relative",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **options: Unpack[StepOptions],
    ) -> None:
        if damping_mode not in ("relative", "fixed"):
            raise ValueError(f"damping_mode must be 'relative' or 'fixed', got {damping_mode!r}")
        if damping is None:
            damping = _DEFAULT_RELATIVE_DAMPING if damping_mode == "relative" else 0.0
        check_number("lr", lr)
        check_number("damping", damping, strict=damping_mode == "relative")
        check_update_extras(weight_decay, momentum)
        check_int("num_terms", num_terms)
        if scale is not None:
            check_number("scale", scale, strict=True)
            if damping_mode == "relative":
                raise ValueError(
                    "scale is estimated in damping_mode='relative'; pass damping_mode='fixed' "
                    "to give it"
                )
        check_int("scale_refresh", scale_refresh)
        defaults = dict(
            lr=lr,
            damping=damping,
            num_terms=num_terms,
            scale=scale,
            damping_mode=damping_mode,
            momentum=momentum,
            weight_decay=weight_decay,
            hvp=hvp,
            scale_refresh=scale_refresh,
        )
        super().__init__(params, defaults, **options)

    @property
    def health_check_every(self) -> int:  # the counters are read when the scale is refreshed
        return self.param_groups[0]["scale_refresh"]

    def _step(self, closure: Callable[[], Any] | None) -> Tensor | None:
        """One NeumannIHVP step (``num_terms`` HVPs); returns the loss."""
        inputs = self._evaluate_step(closure)
        if inputs is None:
            return None
        groups, params, call, ev, g, loss, m, hvp = inputs
        opts = self.param_groups[0]
        relative = opts["damping_mode"] == "relative"
        s = self._scale(hvp, params, g, opts, refresh=call % opts["scale_refresh"] == 0)
        # relative: s = ŝ(1 + damping) and λ = damping·ŝ, so λ/s is constant
        lam = s * (opts["damping"] / (1 + opts["damping"])) if relative else opts["damping"]
        # The series converges while A's eigenvalues stay below 2: a quotient in (1, 2) (an
        # estimated s that went stale by less than 2×) raises s below but needs no fallback.
        res = neumann_series(hvp, m, opts["num_terms"], s, lam, max_quotient=2.0)
        # The fallback g/s' with s' = s·max(1, r): a quotient r proves λ_max(H + λI) ≥ r·s, so a
        # too-small s (a user's scale, or a stale estimate) does not make the fallback diverge.
        safe = s * _largest_quotient(res).clamp_min(1.0).to(s.dtype)
        y = [torch.where(res.diverged, gi / safe, yi) for gi, yi in zip(m, res.solution)]
        if opts["scale"] is None:
            self._raise_stale_scale(res, s)
        ok = self._apply_masked(groups, split_groups(y, groups), all_finite(loss, s, *y))
        self._counter("neumann_fallbacks").add_((res.diverged & ok).to(torch.int64))
        self._detach_grads(params, g)
        return loss

    def _scale(self, hvp, params, like, opts, *, refresh: bool) -> Tensor:
        """``s`` as a 0-d tensor; estimated on schedule when not given (syncs those steps)."""
        if opts["scale"] is not None:
            return torch.full((), opts["scale"], dtype=like[0].dtype, device=like[0].device)
        if refresh or getattr(self, "_estimate_again", False):
            relative = opts["damping_mode"] == "relative"
            lam = 0.0 if relative else opts["damping"]
            top = power_iteration(
                lambda v: torch._foreach_add(hvp(v), torch._foreach_mul(v, lam)),
                params,
                max_iters=20,
                tol=1e-3,
                generator=self.generator,
                warn=False,
                raise_nonfinite=False,
            )
            lam_max = top.eigenvalue.abs().to(like[0].device, like[0].dtype)
            # non-finite curvature (a NaN loss): this step is skipped, and estimated again next
            self._estimate_again = not math.isfinite(float(lam_max))  # a sync step anyway
            if self._estimate_again:
                return lam_max
            if relative:  # ŝ = 1.5·|λ_max(H)|: mini-batch curvature varies between batches
                s = (1.5 * lam_max * (1 + opts["damping"])).clamp_min(
                    torch.finfo(lam_max.dtype).tiny
                )
            else:
                s = 1.05 * lam_max
            self.global_state["scale"] = s
        return self.global_state["scale"]

    def _raise_stale_scale(self, res, s: Tensor) -> None:
        """An estimated ``s`` goes stale as the curvature changes between refreshes. A Rayleigh
        quotient ``r = dᵀAd/dᵀd > 1`` along the series proves ``λ_max(H + λI) ≥ r·s``: raise
        ``s`` to ``1.05·r·s`` at once, on device (no sync), instead of falling back until the
        next refresh. Quotients ``≤ 0`` (negative curvature) are left to the fallback: no scale
        helps there. Beyond the original method; only for an estimated scale."""
        top = _largest_quotient(res).to(s.dtype)
        self.global_state["scale"] = torch.where(top > 1, 1.05 * top * s, s)


def _largest_quotient(res) -> Tensor:
    """The largest finite Rayleigh quotient of ``A = (H + λI)/s`` the series saw (0 if none is
    finite; ``num_terms ≥ 1`` gives at least one)."""
    return torch.nan_to_num(res.rayleigh_quotients, nan=0.0, posinf=0.0, neginf=0.0).max()
