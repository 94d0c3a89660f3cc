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
from ._protocol import CurvatureError, SecondOrderOptimizer, all_finite, check_hyper

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


class PerSampleRows:
    """Per-sample gradients ``∇ℓ_s`` (rows of ``J``) of some parameters, as Woodbury needs them.

    Materialised: ``rows[t]`` has shape ``(B, *p_t.shape)``. Each method returns one entry per
    parameter tensor, so callers can weight tensors differently.
    """

    def __init__(self, params: TensorList, rows: TensorList) -> None:
        self.params, self.rows = params, rows

    def gram(self) -> list[Tensor]:  # J_t J_tᵀ, (B, B)
        return [r.reshape(r.shape[0], -1) @ r.reshape(r.shape[0], -1).T for r in self.rows]

    def jvp(self, g: TensorList) -> list[Tensor]:  # J_t g_t, (B,)
        return [r.reshape(r.shape[0], -1) @ t.reshape(-1) for r, t in zip(self.rows, g)]

    def vjp(self, a: Tensor) -> TensorList:  # J_tᵀ a, parameter-shaped
        return [(a @ r.reshape(r.shape[0], -1)).view(r.shape[1:]) for r in self.rows]

    def gather(self, gather_rows: Callable[[TensorList], TensorList]) -> PerSampleRows:
        return PerSampleRows(self.params, gather_rows(self.rows))


class LinearRows(PerSampleRows):
    """Per-sample gradients of an ``nn.Linear`` layer kept implicit: ``∇W_s = δ_s a_sᵀ``,
    ``∇b_s = δ_s``, from its inputs ``A`` (B×in) and output gradients ``Δ`` (B×out).

    ``⟨∇W_s, ∇W_r⟩ = (a_s·a_r)(δ_s·δ_r)``, so ``J Jᵀ = (ΔΔᵀ)∘(AAᵀ)``,
    ``J g = rowsum((Δ g_W)∘A)`` and ``Jᵀa = Δᵀ diag(a) A`` cost about one forward pass of the
    layer and never form the ``B``
    per-sample weight gradients (Goodfellow, "Efficient per-example gradient computations", 2015).
    """

    def __init__(self, params: TensorList, A: Tensor, D: Tensor) -> None:
        self.params, self.A, self.D = params, A, D

    def gram(self) -> list[Tensor]:
        dd = self.D @ self.D.T
        return [dd * (self.A @ self.A.T), dd][: len(self.params)]

    def jvp(self, g: TensorList) -> list[Tensor]:
        out = [((self.D @ g[0]) * self.A).sum(1)]
        return out + [self.D @ g[1]] if len(self.params) == 2 else out

    def vjp(self, a: Tensor) -> TensorList:
        out = [self.D.T @ (a[:, None] * self.A)]
        return out + [self.D.T @ a] if len(self.params) == 2 else out

    def gather(self, gather_rows: Callable[[TensorList], TensorList]) -> LinearRows:
        A, D = gather_rows([self.A, self.D])
        return LinearRows(self.params, A, D)


def fisher_newton_direction(
    blocks: list[PerSampleRows], g: dict[int, Tensor], c: dict[int, Tensor], batch: int
) -> tuple[dict[int, Tensor], Tensor]:
    """``y = ((1/B) J ᵀJ + Λ)⁻¹ g`` by Woodbury with ``U = Jᵀ/√B``, ``C = I_B``, ``Λ = diag(c_t)``.

    With ``Λ`` constant per tensor: ``a = (I + Σ_t J_tJ_tᵀ/(B c_t))⁻¹ Σ_t J_t g_t/(B c_t)`` and
    ``y_t = (g_t − J_tᵀ a)/c_t`` — for one shared ``c`` this is ``(c I + JJᵀ/B)⁻¹ Jg/B``, the usual
    form. ``g`` and ``c`` are keyed by ``id(param)``. Returns ``(y by id, finite flag)``.
    """
    G = torch.zeros(batch, batch, dtype=torch.float64)
    b = torch.zeros(batch, dtype=torch.float64)
    for blk in blocks:
        # matmuls in the parameters' dtype (an up-cast of the B×N rows would cost more than the
        # step); only the B×B system is float64
        ids = [id(p) for p in blk.params]
        gs = [g[i] for i in ids]
        for i, gram_t, jg_t in zip(ids, blk.gram(), blk.jvp(gs)):
            scale = (batch * c[i]).to(torch.float64)
            G = G.to(gram_t.device) + gram_t.to(torch.float64) / scale
            b = b.to(jg_t.device) + jg_t.to(torch.float64) / scale
    eye = torch.eye(batch, dtype=torch.float64, device=G.device)
    a = _ext.lowrank_coefficients(G, b, eye, 1.0)
    y = {}
    for blk in blocks:
        a_t = a.to(blk.params[0].dtype)
        for p, ja in zip(blk.params, blk.vjp(a_t)):
            y[id(p)] = (g[id(p)] - ja) / c[id(p)]
    return y, all_finite(G, b, a)


class _LinearCapture:
    """During the closure, record input and output of every ``nn.Linear`` in ``module`` whose
    parameters are being optimised, for the implicit per-sample rows of :class:`LinearRows`.

    Only layers called exactly once with a 2-D ``(B, in)`` input qualify (a shared or
    sequence-applied layer would need cross terms); the others fall back to materialised rows.
    """

    def __init__(self, module: torch.nn.Module | None, params: TensorList) -> None:
        self.module, self.ids = module, {id(p) for p in params}
        self.calls: dict[torch.nn.Linear, list[tuple[Tensor, Tensor]]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _LinearCapture:
        if self.module is None:
            return self
        for layer in self.module.modules():
            if isinstance(layer, torch.nn.Linear) and id(layer.weight) in self.ids:
                self.handles.append(layer.register_forward_hook(self._record))
        return self

    def _record(self, layer, inputs, output) -> None:
        self.calls.setdefault(layer, []).append((inputs[0], output))

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def layers(self) -> list[tuple[Tensor, Tensor, TensorList]]:
        out = []
        for layer, calls in self.calls.items():
            ((A, z),) = calls if len(calls) == 1 else ((None, None),)
            if A is None or A.dim() != 2 or z.dim() != 2:
                continue
            ps = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            if all(id(p) in self.ids for p in ps):
                out.append((A.detach(), z, ps))
        return out


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
        generator, process_group: as in :class:`RankOneNewton`. Distributed: per-sample rows
            are all-gathered, so ``D`` is the Fisher of the union batch.
        module: optional model whose ``nn.Linear`` layers (called once per step on ``(B, in)``
            inputs) get implicit per-sample gradients (:class:`LinearRows`): the ``B×B`` Gram
            from layer inputs and output gradients, never ``B`` copies of the weights. Other
            parameters use materialised per-sample gradients (one batched backward). Same
            result, much less memory traffic: pass it for MLP-like models.

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
        module: torch.nn.Module | None = None,
    ) -> None:
        check_hyper("lr", lr)
        check_hyper("damping", damping)
        check_hyper("f_star", f_star)
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
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
        self.module = module

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:
        """One FisherNewton step; returns the mean of the closure's per-sample losses."""
        groups = self._begin_step()
        if closure is None:
            raise CurvatureError(
                "FisherNewton needs per-sample losses: opt.step(closure) with a closure that "
                "returns the 1-D tensor of per-sample losses (reduction='none') without calling "
                "backward()."
            )
        params = [p for ps in groups for p in ps]
        defaults = self.param_groups[0]
        self._next_call()  # state["step_calls"], as every optimizer here keeps it
        self._sync_generator()
        with _LinearCapture(self.module, params) as capture:
            losses, fisher_losses = self._per_sample_losses(closure, params, defaults)
        rows_losses = losses if fisher_losses is None else fisher_losses
        with torch.enable_grad():
            blocks = self._blocks(
                rows_losses, params, capture, keep_graph=fisher_losses is not None
            )
            if fisher_losses is None:  # g = mean of the rows
                ones = torch.full_like(rows_losses, 1.0 / rows_losses.shape[0]).detach()
                g_by_id = {id(p): t for blk in blocks for p, t in zip(blk.params, blk.vjp(ones))}
            else:  # g from the data labels
                grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
                g_by_id = {id(p): gp for p, gp in zip(params, grads)}
        g_local = [g_by_id.get(id(p), torch.zeros_like(p)) for p in params]
        loss_local = losses.detach().mean()
        if self._distributed():
            # Ranks may hold different batch sizes: all_gather needs equal shapes, and the union
            # batch's mean weights rank r's mean by B_r/B (1 for equal sizes). One small
            # all_gather and one host sync per step, for the shapes.
            sizes = self._batch_sizes(losses.shape[0], losses.device)
            weight = len(sizes) * losses.shape[0] / sum(sizes)
            if weight != 1.0:
                g_local = [t * weight for t in g_local]
                loss_local = loss_local * weight
            blocks = [blk.gather(lambda rows: self._gather_rows(rows, sizes)) for blk in blocks]
        g = self._average(g_local)
        g_by_id = {id(p): gp for p, gp in zip(params, g)}
        batch = (blocks[0].A if isinstance(blocks[0], LinearRows) else blocks[0].rows[0]).shape[0]
        loss = self._average([loss_local])[0]
        c_groups = self._damping(g, loss, defaults)
        c_by_id = {id(p): c for c, ps in zip(c_groups, groups) for p in ps}
        y, solved = fisher_newton_direction(blocks, g_by_id, c_by_id, batch)
        ok = solved & all_finite(loss, torch.stack(c_groups))
        self._apply_masked(groups, [[y[id(p)] for p in ps] for ps in groups], ok)
        self.state["damping"] = c_groups[0].detach()
        self._detach_grads(params, g)
        return loss

    @staticmethod
    def _blocks(
        losses: Tensor, params: TensorList, capture: _LinearCapture, *, keep_graph: bool
    ) -> list[PerSampleRows]:
        """Implicit rows for captured ``nn.Linear`` layers, materialised rows for the rest."""
        layers = capture.layers()
        blocks: list[PerSampleRows] = []
        covered = {id(p) for _, _, ps in layers for p in ps}
        rest = [p for p in params if id(p) not in covered]
        if layers:
            # δ_s = ∂ℓ_s/∂z_s: samples do not interact, so one backward of Σ ℓ_s gives them all
            deltas = torch.autograd.grad(
                losses.sum(),
                [out for _, out, _ in layers],
                retain_graph=bool(rest) or keep_graph,
                allow_unused=True,
            )
            for (A, out, ps), D in zip(layers, deltas):
                D = torch.zeros_like(out) if D is None else D
                blocks.append(LinearRows(ps, A, D.detach()))
        if rest:
            blocks.append(
                PerSampleRows(rest, per_sample_grads(losses, rest, retain_graph=keep_graph))
            )
        return blocks

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

    def _batch_sizes(self, local: int, device: torch.device) -> list[int]:
        """Every rank's batch size, in rank order."""
        world = dist.get_world_size(self.process_group)
        mine = torch.tensor([local], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=self.process_group)
        return torch.cat(parts).tolist()

    def _gather_rows(self, per_sample: TensorList, sizes: list[int]) -> TensorList:
        """All ranks' rows (per-sample gradients or layer inputs/output gradients), stacked in
        rank order, so ``D`` is the Fisher of the union batch; ``sizes``: rows per rank."""
        world = len(sizes)
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in per_sample], dim=1).contiguous()
        if flat.shape[0] < max(sizes):  # all_gather needs equal shapes: pad with zero rows
            flat = torch.cat([flat, flat.new_zeros(max(sizes) - flat.shape[0], flat.shape[1])])
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat, group=self.process_group)
        rows = torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)
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
