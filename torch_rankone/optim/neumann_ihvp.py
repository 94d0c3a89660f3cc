"""NeumannIHVP: Newton-type step with the inverse Hessian applied by a truncated Neumann series.

SPEC §4.3, seed 003. With ``A = (H + λI)/s`` and ``K = num_terms``,

    y = (1/s) Σ_{j=0..K} (I − A)^j g,     x ← x − lr · y,

exactly ``K`` HVPs per step (:func:`torch_rankone.linalg.neumann_series`). The series converges
for ``H + λI`` positive definite and ``s > λ_max(H + λI)``; ``s`` is given or estimated by power
iteration (``1.05·|λ_max(H + λI)|``) and refreshed every ``scale_refresh`` steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..curvature import power_iteration
from ..linalg import neumann_series
from ._protocol import (
    HVP_MODES,
    SecondOrderOptimizer,
    all_finite,
    check_hyper,
    evaluate,
    split_groups,
)

__all__ = ["NeumannIHVP"]


class NeumannIHVP(SecondOrderOptimizer):
    r"""Newton-type optimizer with a truncated Neumann-series inverse Hessian (SPEC §4.3).

    .. math::
        y = \frac1s \sum_{j=0}^{K} \Bigl(I - \frac{H + \lambda I}{s}\Bigr)^j \nabla f(x),
        \qquad x \leftarrow x - \mathrm{lr}\, y

    Args:
        lr: step size (per group).
        damping: ``λ`` added to the Hessian.
        num_terms: ``K``, HVPs per step.
        scale: ``s``; ``None`` estimates ``1.05·|λ_max(H + λI)|`` by power iteration (20 HVPs,
            host synchronisation) at the first step and every ``scale_refresh`` steps.
        hvp: curvature source ``"auto" | "exact" | "fd"`` (as for :class:`RankOneNewton`).
        process_group: average gradients and HVPs over this group (default: the world group
            whenever ``torch.distributed`` is initialised).

    Divergence (a Rayleigh quotient of ``A`` outside ``(0, 1]`` along the series' iterates, a
    growing term, or a non-finite value) is detected on device; that step falls back to the
    damped gradient step ``y = g/s`` — never a NaN update — and ``state["neumann_fallbacks"]``
    counts it. With an estimated scale, a quotient ``r > 1`` also raises ``s`` to ``1.05·r·s``
    for the following steps (on device; the curvature grew since the last estimate). The
    ``RuntimeWarning`` about fallbacks is emitted at the next scheduled sync point (every
    ``scale_refresh`` calls), so the other steps stay free of host syncs. Non-finite losses and
    gradients are masked as for the other optimizers (``state["skipped_steps"]``).
    """

    _per_group = ("lr",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1.0,
        damping: float = 0.0,
        num_terms: int = 10,
        scale: float | None = None,
        scale_refresh: int = 100,
        hvp: str = "auto",
        *,
        process_group: Any = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_hyper("lr", lr)
        check_hyper("damping", damping)
        if not isinstance(num_terms, int) or num_terms < 1:
            raise ValueError(f"num_terms must be an int >= 1, got {num_terms!r}")
        if scale is not None:
            check_hyper("scale", scale, strict=True)
        if not isinstance(scale_refresh, int) or scale_refresh < 1:
            raise ValueError(f"scale_refresh must be an int >= 1, got {scale_refresh!r}")
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        defaults = dict(lr=lr, damping=damping, num_terms=num_terms, scale=scale)
        super().__init__(params, defaults, generator=generator, process_group=process_group)
        for group in self.param_groups:
            check_hyper("param group lr", group["lr"])
        self.hvp_mode = hvp
        self.scale_refresh = scale_refresh
        self._reported_fallbacks = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:
        """One NeumannIHVP step (``num_terms`` HVPs); returns the loss."""
        groups = self._begin_step()
        params = [p for ps in groups for p in ps]
        if not params:
            return None
        self._sync_generator()
        opts = self.param_groups[0]
        ev = evaluate(params, closure, self.hvp_mode)
        g, loss = self._average_with_loss(ev.grads, ev.loss)

        def hvp(v):
            return self._average(ev.hvp_fn(v))

        call = self._next_call()
        if call % self.scale_refresh == 0:
            self._report_fallbacks()  # a scheduled sync point: surface earlier fallbacks
        s = self._scale(hvp, g, opts, refresh=call % self.scale_refresh == 0)
        res = neumann_series(hvp, g, opts["num_terms"], s, opts["damping"])
        y = [torch.where(res.diverged, gi / s, yi) for gi, yi in zip(g, res.solution)]
        if opts["scale"] is None:
            self._raise_stale_scale(res, s)
        fallbacks = self._counter("neumann_fallbacks", params[0])
        fallbacks.add_(res.diverged.to(torch.int64))
        ok = all_finite(loss, s, *y)
        self._apply_masked(groups, split_groups(y, groups), ok)
        self._detach_grads(params, g)
        return loss

    def _scale(self, hvp, like, opts, *, refresh: bool) -> Tensor:
        """``s`` as a 0-d tensor; estimated on schedule when not given (syncs those steps)."""
        if opts["scale"] is not None:
            return torch.as_tensor(opts["scale"], dtype=like[0].dtype, device=like[0].device)
        if "scale" not in self.state or refresh:
            lam = opts["damping"]
            top = power_iteration(
                lambda v: torch._foreach_add(hvp(v), torch._foreach_mul(v, lam)),
                like,
                max_iters=20,
                tol=1e-3,
                generator=self.generator,
                warn=False,
            )
            self.state["scale"] = 1.05 * top.eigenvalue.abs().to(like[0].device, like[0].dtype)
        return self.state["scale"]

    def _raise_stale_scale(self, res, s: Tensor) -> None:
        """An estimated ``s`` goes stale as the curvature changes between refreshes. A Rayleigh
        quotient ``r = dᵀAd/dᵀd > 1`` along the series proves ``λ_max(H + λI) ≥ r·s``: raise
        ``s`` to ``1.05·r·s`` at once, on device (no sync), instead of falling back until the
        next refresh. Quotients ``≤ 0`` (negative curvature) are left to the fallback: no scale
        helps there. Beyond the seed; only for ``scale=None``."""
        quotients = res.rayleigh_quotients
        top = torch.nan_to_num(quotients, nan=0.0, posinf=0.0).max() if quotients.numel() else None
        if top is not None:
            raised = torch.where(top > 1, 1.05 * top.to(s.dtype) * s, s)
            self.state["scale"] = raised

    def _report_fallbacks(self) -> None:
        count = int(self.state["neumann_fallbacks"]) if "neumann_fallbacks" in self.state else 0
        if count > self._reported_fallbacks:
            warnings.warn(
                f"NeumannIHVP: the Neumann series diverged in {count - self._reported_fallbacks} "
                "step(s), which fell back to the damped gradient step g/s. Increase damping "
                "(H + λI must be positive definite) or the scale.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._reported_fallbacks = count
