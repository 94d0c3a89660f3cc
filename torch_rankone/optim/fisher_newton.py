"""FisherNewton: Newton-type step preconditioned by the empirical Fisher (seed 000, seed 003).

SPEC §4.2. With per-sample losses ``ℓ_s = −log p(b_s | a_s, x)``, ``s = 1..B``, per-sample
gradients ``g_s`` and ``g = mean_s g_s``:

    D = (1/B) Σ_s g_s g_sᵀ   (rank ≤ B, never formed),   x ← x − lr · (D + αI)⁻¹ g,

by Woodbury with ``U = [g_1 .. g_B]/√B`` and ``C = I_B``: the ``B×B`` Gram matrix of the per-sample
gradients, one Cholesky-sized solve, and one pass to apply. Seed 003 motivates ``D`` as the
outer-product (Bartlett) approximation of the Hessian.

Reference: A. Semenov, "Rank-one approximation of the Hessian", MLO group meeting, 2025.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _ext
from .._tensorlist import TensorList, norm
from ..curvature import per_sample_grads
from ._protocol import CurvatureError, SecondOrderOptimizer, all_finite, check_hyper, split_groups

__all__ = ["FisherNewton", "fisher_sigma", "fisher_newton_direction"]

LOSS_TYPES = ("cross_entropy", "mse")


def fisher_sigma(
    loss_type: str, f: Tensor, *, smoothness: float | None = None, f_star: float = 0.0
) -> Tensor:
    """The slides' bound on ``‖∇²f − D‖`` for the mean loss ``f`` (SPEC §4.2).

    The slides state it for the summed loss ``f_Σ = B f`` (with ``∇f_Σ`` and ``D_Σ`` sums):
    ``σ_Σ ≤ 2 f_Σ`` (softmax cross-entropy) and ``σ_Σ ≤ L√(2B)(√(f_Σ − f*_Σ) + √f*_Σ)`` (least
    squares, ``ℓ_s = ½(φ_s − b_s)²``). Dividing the whole Newton system by ``B`` gives the mean
    form used here: ``σ = 2f`` and ``σ = L√2 (√(f − f*) + √f*)``, ``f*`` the optimal mean loss.
    """
    if loss_type == "cross_entropy":
        return 2 * f
    gap = (f - f_star).clamp_min(0)
    return smoothness * math.sqrt(2) * (gap.sqrt() + math.sqrt(f_star))


def fisher_newton_direction(
    per_sample: TensorList, g: TensorList, c: list[Tensor]
) -> tuple[TensorList, Tensor]:
    """``y = ((1/B) Σ g_s g_sᵀ + Λ)⁻¹ g`` from per-sample gradients stacked as ``(B, *p.shape)``.

    ``Λ`` is diagonal, constant per tensor (``c[t]``); as in RankOneNewton, unequal values are
    handled by the rescaling ``Λ^{-1/2}``. Returns ``(y, finite_flag)``.
    """
    B = per_sample[0].shape[0]
    uniform = all(ci is c[0] for ci in c)
    w = None if uniform else [ci.rsqrt() for ci in c]
    J = [j.reshape(B, -1) / math.sqrt(B) for j in per_sample]  # U, one block per tensor
    gv = [t.reshape(-1) for t in g]
    if w is not None:
        J = [j * wi for j, wi in zip(J, w)]
        gv = [t * wi for t, wi in zip(gv, w)]
    G = sum(j.to(torch.float64) @ j.T.to(torch.float64) for j in J)  # UᵀU, B×B
    b = sum(j.to(torch.float64) @ t.to(torch.float64) for j, t in zip(J, gv))  # Uᵀg
    c_solve = c[0] if uniform else 1.0
    a = _ext.lowrank_coefficients(G, b, torch.eye(B, dtype=torch.float64), c_solve)
    a = a.to(g[0].dtype)
    y = [((t - a @ j) / c_solve).view_as(p) for t, j, p in zip(gv, J, g)]
    if w is not None:
        y = torch._foreach_mul(y, w)
    return y, all_finite(G, b, a)


class FisherNewton(SecondOrderOptimizer):
    r"""Newton-type optimizer with the empirical Fisher (SPEC §4.2, seed 000).

    .. math::
        D = \tfrac1B \sum_s g_s g_s^\top,\qquad
        x \leftarrow x - \mathrm{lr}\,(D + \alpha I)^{-1} \tfrac1B \sum_s g_s

    ``step(closure)``: the closure returns the 1-D tensor of per-sample losses
    ``ℓ_s = −log p(b_s | a_s, x)`` (e.g. ``cross_entropy(..., reduction="none")``) without calling
    ``backward``; per-sample gradients come from one batched backward. ``step`` returns the mean.

    Args:
        lr: step size.
        damping: ``α`` for ``damping_mode="fixed"``; groups may set their own ``lr`` and
            ``damping``.
        damping_mode: ``"fixed"`` or ``"theory"``: ``α_k = sqrt(M‖g_k‖/2) + σ(x_k)`` with the
            slides' ``σ`` (see :func:`fisher_sigma`; ``f`` is the mean loss of the batch).
        loss_type: ``"cross_entropy"`` (softmax) or ``"mse"`` (``ℓ_s = ½(φ_s − b_s)²``): selects
            the ``σ`` bound and, for ``fisher="true"``, the predictive distribution.
        hessian_lipschitz: ``M`` (theory mode). smoothness: ``L`` of the model outputs (theory,
            ``mse``). f_star: optimal mean loss ``f*`` (theory, ``mse``).
        fisher: ``"empirical"`` (data labels, the slides' method) or ``"true"`` (beyond the
            seeds): the closure returns ``(outputs, targets)`` — logits ``(B, K)`` and class
            indices for cross-entropy, predictions and values for mse — and ``D`` uses labels
            sampled from the model (``Categorical(softmax)``, or ``N(φ, 1)``) with the
            optimizer's generator, while ``g`` uses the data labels.
        generator, process_group: as in :class:`RankOneNewton`. Distributed: per-sample gradients
            are all-gathered, so ``D`` is the Fisher of the union batch.

    State: ``state["step"]``, ``state["skipped_steps"]``, ``state["damping"]``.
    """

    _per_group = ("lr", "damping")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1.0,
        damping: float = 1e-3,
        damping_mode: str = "fixed",
        loss_type: str = "cross_entropy",
        hessian_lipschitz: float | None = None,
        smoothness: float | None = None,
        f_star: float = 0.0,
        fisher: str = "empirical",
        *,
        generator: torch.Generator | None = None,
        process_group: Any = None,
    ) -> None:
        check_hyper("lr", lr)
        check_hyper("damping", damping)
        check_hyper("f_star", f_star)
        if damping_mode not in ("fixed", "theory"):
            raise ValueError(f"damping_mode must be 'fixed' or 'theory', got {damping_mode!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if damping_mode == "theory":
            if hessian_lipschitz is None:
                raise ValueError("damping_mode='theory' needs hessian_lipschitz (M)")
            check_hyper("hessian_lipschitz", hessian_lipschitz, strict=True)
            if loss_type == "mse":
                if smoothness is None:
                    raise ValueError(
                        "damping_mode='theory' with loss_type='mse' needs smoothness (L)"
                    )
                check_hyper("smoothness", smoothness, strict=True)
        if damping_mode == "fixed" and damping <= 0:
            raise ValueError(
                "FisherNewton needs damping > 0 in fixed mode: D has rank ≤ B < N, so D + αI is "
                "singular at α = 0"
            )
        defaults = dict(
            lr=lr,
            damping=damping,
            damping_mode=damping_mode,
            loss_type=loss_type,
            hessian_lipschitz=hessian_lipschitz,
            smoothness=smoothness,
            f_star=f_star,
            fisher=fisher,
        )
        super().__init__(params, defaults, generator=generator, process_group=process_group)
        for group in self.param_groups:
            check_hyper("param group lr", group["lr"])
            check_hyper("param group damping", group["damping"], strict=damping_mode == "fixed")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:
        """One FisherNewton step; returns the mean of the closure's per-sample losses."""
        if closure is None:
            raise CurvatureError(
                "FisherNewton needs per-sample losses: opt.step(closure) with a closure that "
                "returns the 1-D tensor of per-sample losses (reduction='none') without calling "
                "backward()."
            )
        groups = self._group_params()
        params = [p for ps in groups for p in ps]
        defaults = self.param_groups[0]
        self._sync_generator()
        losses, fisher_losses = self._per_sample_losses(closure, params, defaults)
        with torch.enable_grad():
            if fisher_losses is None:
                per_sample = per_sample_grads(losses, params)
            else:
                per_sample = per_sample_grads(losses, params, retain_graph=True)
                fisher_rows = per_sample_grads(fisher_losses, params)
        g = self._average([ps.mean(0) for ps in per_sample])
        if fisher_losses is not None:
            per_sample = fisher_rows
        per_sample = self._gather_rows(per_sample)
        loss = self._average([losses.detach().mean()])[0]
        c_groups = self._damping(g, loss, defaults)
        c_tensors = [c for c, ps in zip(c_groups, groups) for _ in ps]
        y, solved = fisher_newton_direction(per_sample, g, c_tensors)
        ok = solved & all_finite(loss, torch.stack(c_groups))
        self._apply_masked(groups, split_groups(y, groups), ok)
        self.state["damping"] = c_groups[0].detach()
        self._detach_grads(params, g)
        return loss

    def _per_sample_losses(self, closure, params, defaults) -> tuple[Tensor, Tensor | None]:
        with torch.enable_grad():
            out = closure()
        if defaults["fisher"] == "true":
            if not (isinstance(out, tuple) and len(out) == 2):
                raise CurvatureError(
                    "fisher='true': the closure must return (outputs, targets) — logits and "
                    "class indices for cross_entropy, predictions and values for mse"
                )
            outputs, targets = out
            return self._true_fisher_losses(outputs, targets, defaults["loss_type"])
        if not isinstance(out, Tensor) or out.dim() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise CurvatureError(
                "FisherNewton: the closure must return a 1-D tensor of per-sample losses "
                f"(use reduction='none'), got {shape}"
            )
        if not out.requires_grad:
            raise CurvatureError(
                "FisherNewton: the per-sample losses carry no graph; return them without calling "
                "backward() and without detaching"
            )
        return out, None

    def _true_fisher_losses(self, outputs: Tensor, targets: Tensor, loss_type: str):
        with torch.enable_grad():
            if loss_type == "cross_entropy":
                losses = torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
                probs = outputs.detach().softmax(-1).cpu().to(torch.float64)
                sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
                model_losses = torch.nn.functional.cross_entropy(
                    outputs, sampled.to(outputs.device), reduction="none"
                )
            else:
                pred = outputs.reshape(outputs.shape[0], -1)
                losses = 0.5 * (pred - targets.reshape(pred.shape)).pow(2).sum(1)
                noise = torch.randn(pred.shape, generator=self.generator, dtype=pred.dtype)
                model_losses = 0.5 * (pred - (pred.detach() + noise.to(pred.device))).pow(2).sum(1)
        return losses, model_losses

    def _gather_rows(self, per_sample: TensorList) -> TensorList:
        """All ranks' per-sample gradients, so ``D`` is the Fisher of the union batch."""
        if not self._distributed():
            return per_sample
        world = dist.get_world_size(self.process_group)
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in per_sample], dim=1).contiguous()
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat, group=self.process_group)
        rows = torch.cat(parts, dim=0)
        out, offset = [], 0
        for t in per_sample:
            width = t[0].numel()
            out.append(rows[:, offset : offset + width].reshape(rows.shape[0], *t.shape[1:]))
            offset += width
        return out

    def _damping(self, g: TensorList, loss: Tensor, defaults: dict) -> list[Tensor]:
        device, dtype = g[0].device, g[0].dtype
        if defaults["damping_mode"] == "fixed":
            cache: dict[float, Tensor] = {}
            return [
                cache.setdefault(
                    grp["damping"], torch.tensor(grp["damping"], dtype=dtype, device=device)
                )
                for grp in self.param_groups
            ]
        sigma = fisher_sigma(
            defaults["loss_type"],
            loss.to(dtype),
            smoothness=defaults["smoothness"],
            f_star=defaults["f_star"],
        )
        alpha = torch.sqrt(defaults["hessian_lipschitz"] * norm(g) / 2) + sigma
        return [alpha] * len(self.param_groups)
