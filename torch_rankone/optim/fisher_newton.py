"""FisherNewton: Newton-type step preconditioned by the empirical Fisher.

With per-sample losses ``ℓ_s = −log p(b_s | a_s, x)``, ``s = 1..B``, per-sample gradients
``g_s`` and ``g = mean_s g_s``, the empirical Fisher is

    D = (1/B) Σ_s g_s g_sᵀ   (rank ≤ B, never formed)

(J. Martens, "New insights and perspectives on the natural gradient method", JMLR 2020), also
the outer-product (Bartlett) approximation of the Hessian. The step solves with ``D`` plus a
multiple of the identity by Woodbury with ``U = [g_1 .. g_B]/√B`` and ``C = I_B``: the ``B×B``
Gram matrix of the per-sample gradients, one Cholesky-sized solve, and one pass to apply.

* relative damping (default): ``c = damping · tr(D)/B``, ``x ← x − lr · c (D + cI)⁻¹ g``;
* fixed / theory damping: ``x ← x − lr · (D + αI)⁻¹ g`` (A. Semenov, "Rank-one approximation
  of the Hessian", MLO group meeting, 2025).

Per-sample gradients of ``nn.Linear`` and ``nn.Conv2d`` layers come from the layers' inputs and
output gradients (:class:`LinearRows`, :class:`Conv2dRows`); other parameters from one vmapped
backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .._tensorlist import TensorList, embed_shard, norm, shard_of, sum_over_shards
from .._validation import check_number
from ..curvature import per_sample_grads
from ._protocol import (
    CurvatureError,
    SecondOrderOptimizer,
    all_finite,
    check_update_extras,
    grad_snapshot,
    grads_written,
)

__all__ = ["FisherNewton", "fisher_sigma", "fisher_newton_direction"]

LOSS_TYPES = ("cross_entropy", "mse")
DAMPING_MODES = ("relative", "fixed", "theory")
_DEFAULT_RELATIVE_DAMPING = 2.0


def fisher_sigma(
    loss_type: str, f: Tensor, *, smoothness: float | None = None, f_star: float = 0.0
) -> Tensor:
    """The slides' bound on ``‖∇²f − D‖`` for the mean loss ``f`` (Semenov, 2025).

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

    @property
    def batch(self) -> int:
        return self.rows[0].shape[0]

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
    layer and never form the ``B`` per-sample weight gradients (Goodfellow, "Efficient
    per-example gradient computations", 2015).
    """

    def __init__(self, params: TensorList, A: Tensor, D: Tensor) -> None:
        self.params, self.A, self.D = params, A, D

    @property
    def batch(self) -> int:
        return self.A.shape[0]

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


def conv2d_supported(layer: torch.nn.Module) -> bool:
    """Whether :class:`Conv2dRows` applies: an ``nn.Conv2d`` of any stride, padding (numbers,
    ``"same"``, ``"valid"``; any ``padding_mode``), dilation and groups, whose class keeps
    ``nn.Conv2d``'s convolution (a subclass computing something else falls back)."""
    cls = type(layer)
    return (
        isinstance(layer, torch.nn.Conv2d)
        and cls.forward is torch.nn.Conv2d.forward
        and cls._conv_forward is torch.nn.Conv2d._conv_forward
    )


def _conv2d_padding(layer: torch.nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of the layer's input, as ``F.pad`` takes it."""
    (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
    if layer.padding == "valid":
        return 0, 0, 0, 0
    if layer.padding == "same":  # as nn.Conv2d: the odd pixel goes to the end
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = layer.padding
    return pw, pw, ph, ph


class Conv2dRows(PerSampleRows):
    """Per-sample gradients of an ``nn.Conv2d`` layer from its input ``A`` (B, C, H, W) and
    output gradients ``Δ`` (B, O, H', W'): ``∇W_s = Δ_s U_sᵀ`` with ``U_s`` the input patches
    (L × kh·kw·C/groups, L = H'·W') and ``Δ_s`` (O × L); ``∇b_s = Δ_s 1``.

    The patches are cut from a channels-last copy of the padded input (a strided view copied
    once: about twice as fast as ``F.unfold``) and multiplied per sample and group with one
    batched matrix product. Materialising the ``B`` weight gradients (``B·O·C·kh·kw`` numbers)
    is cheaper than the implicit Gram ``Σ (Δ_sᵀΔ_r)∘(U_sᵀU_r)``, which costs ``B²L²(O + C·kh·kw)``
    against ``B·O·C·kh·kw·(L + B)``. The rows are stored in ``(O, kh, kw, C/groups)`` order;
    :meth:`jvp` and :meth:`vjp` permute the (small) parameter-shaped tensors to match.
    """

    @classmethod
    def from_layer(cls, layer: torch.nn.Conv2d, A: Tensor, D: Tensor) -> Conv2dRows:
        """Rows of ``[layer.weight, layer.bias]`` from the layer's input and the gradient of
        ``Σ_s ℓ_s`` at its output."""
        B, C, H, W = A.shape
        O, G = layer.out_channels, layer.groups
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        left, right, top, bottom = _conv2d_padding(layer)
        if layer.padding_mode == "zeros":  # pad straight into the channels-last buffer
            Ap = A.new_zeros(B, H + top + bottom, W + left + right, C)
            Ap[:, top : top + H, left : left + W] = A.permute(0, 2, 3, 1)
        else:
            pads = (left, right, top, bottom)
            Ap = F.pad(A, pads, mode=layer.padding_mode).permute(0, 2, 3, 1).contiguous()
        # (B, H', W', C, kh, kw) view of every patch, copied once as (B·G, L, kh·kw·C/G)
        patches = Ap.unfold(1, dh * (kh - 1) + 1, sh)[..., ::dh]
        patches = patches.unfold(2, dw * (kw - 1) + 1, sw)[..., ::dw]
        L = patches.shape[1] * patches.shape[2]
        U = patches.unflatten(3, (G, C // G)).permute(0, 3, 1, 2, 5, 6, 4)
        U = U.reshape(B * G, L, kh * kw * (C // G))
        delta = D.reshape(B * G, O // G, L)
        rows = [torch.bmm(delta, U).view(B, O, kh, kw, C // G)]
        params = [layer.weight]
        if layer.bias is not None:
            params.append(layer.bias)
            rows.append(D.sum((2, 3)))
        return cls(params, rows)

    def param_shaped(self) -> TensorList:
        """The rows as ``(B, *p.shape)`` tensors."""
        return [self.rows[0].permute(0, 1, 4, 2, 3).contiguous(), *self.rows[1:]]

    def jvp(self, g: TensorList) -> list[Tensor]:
        w = self.rows[0]
        out = [w.view(w.shape[0], -1) @ g[0].permute(0, 2, 3, 1).reshape(-1)]
        return out + [self.rows[1] @ g[1]] if len(self.rows) == 2 else out

    def vjp(self, a: Tensor) -> TensorList:
        w = self.rows[0]
        out = [(a @ w.view(w.shape[0], -1)).view(w.shape[1:]).permute(0, 3, 1, 2).contiguous()]
        return out + [a @ self.rows[1]] if len(self.rows) == 2 else out

    def gather(self, gather_rows: Callable[[TensorList], TensorList]) -> Conv2dRows:
        return Conv2dRows(self.params, gather_rows(self.rows))


def fisher_newton_direction(
    blocks: list[PerSampleRows],
    g: dict[int, Tensor],
    c: dict[int, Tensor],
    batch: int,
    grams: list[list[Tensor]] | None = None,
    *,
    times_damping: bool = False,
    sum_partial: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[int, Tensor], Tensor]:
    """``y = ((1/B) J ᵀJ + Λ)⁻¹ g`` by Woodbury with ``U = Jᵀ/√B``, ``C = I_B``, ``Λ = diag(c_t)``.

    With ``Λ`` constant per tensor: ``a = (I + Σ_t J_tJ_tᵀ/(B c_t))⁻¹ Σ_t J_t g_t/(B c_t)`` and
    ``y_t = (g_t − J_tᵀ a)/c_t`` — for one shared ``c`` this is ``(c I + JJᵀ/B)⁻¹ Jg/B``, the usual
    form. ``times_damping``: return ``Λ y`` (``g_t − J_tᵀ a``) instead. ``g`` and ``c`` are keyed
    by ``id(param)``; ``grams`` are the blocks' ``J_tJ_tᵀ`` when already computed.
    ``sum_partial``: ``g`` holds one rank's pieces (zero elsewhere), so ``J g`` is a partial sum
    that this completes over the ranks. Returns ``(y by id, finite flag)``.
    """
    grams = [blk.gram() for blk in blocks] if grams is None else grams
    # tensors sharing one damping tensor are summed first (float64), then scaled once
    parts: dict[int, tuple[Tensor, list[Tensor], list[Tensor]]] = {}
    for blk, blk_grams in zip(blocks, grams):
        # matmuls in the parameters' dtype (an up-cast of the B×N rows would cost more than the
        # step); only the B×B system is float64
        for p, gram_t, jg_t in zip(blk.params, blk_grams, blk.jvp([g[id(p)] for p in blk.params])):
            c_t = c[id(p)]
            entry = parts.setdefault(id(c_t), (c_t, [], []))
            entry[1].append(gram_t)
            entry[2].append(jg_t)
    G = b = None
    for c_t, gram_ts, jg_ts in parts.values():
        scale = batch * c_t.to(torch.float64)
        G_t = torch.stack([t.to(torch.float64) for t in gram_ts]).sum(0) / scale
        b_t = torch.stack([t.to(torch.float64) for t in jg_ts]).sum(0) / scale
        G, b = (G_t, b_t) if G is None else (G + G_t, b + b_t)
    if sum_partial is not None:
        b = sum_partial(b)
    G.diagonal().add_(1.0)  # I + JJᵀ/(BΛ): symmetric positive definite
    chol, info = torch.linalg.cholesky_ex(G)
    a = torch.cholesky_solve(b[:, None], chol).squeeze(1)
    ok = (info == 0) & torch.isfinite(a).all()
    y = {}
    for blk in blocks:
        a_t = a.to(blk.params[0].dtype)
        for p, ja in zip(blk.params, blk.vjp(a_t)):
            y[id(p)] = g[id(p)] - ja if times_damping else (g[id(p)] - ja) / c[id(p)]
    return y, ok


def layer_rows(layer: torch.nn.Module, A: Tensor, D: Tensor) -> TensorList:
    """Per-sample gradients ``[∇weight_s, ∇bias_s]`` (leading dimension ``B``) of one layer from
    its input ``A`` and the gradient ``D`` of ``Σ_s ℓ_s`` at its output — samples do not
    interact, so one backward gives every sample's output gradient. ``nn.Linear`` on
    ``(B, …, in)`` (sequences: ``∇W_s = Σ_l δ_{s,l} a_{s,l}ᵀ``), ``nn.Conv2d``, ``nn.LayerNorm`` and
    ``nn.Embedding``; one batched product each instead of ``B`` backward passes."""
    B = A.shape[0]
    if isinstance(layer, torch.nn.Linear):
        a, d = A.reshape(B, -1, A.shape[-1]), D.reshape(B, -1, D.shape[-1])
        rows = [torch.bmm(d.transpose(1, 2), a)]
        bias = d.sum(1)
    elif isinstance(layer, torch.nn.Conv2d):
        return Conv2dRows.from_layer(layer, A, D).param_shaped()
    elif isinstance(layer, torch.nn.LayerNorm):
        shape = layer.normalized_shape
        x_hat = torch.nn.functional.layer_norm(A, shape, eps=layer.eps)
        dims = tuple(range(1, A.dim() - len(shape)))
        rows = [(D * x_hat).sum(dims) if dims else D * x_hat]
        bias = D.sum(dims) if dims else D
    else:  # nn.Embedding: scatter each sample's output gradients into its rows
        idx, d = A.reshape(B, -1), D.reshape(B, -1, D.shape[-1])
        w = d.new_zeros(B, *layer.weight.shape)
        w.scatter_add_(1, idx[..., None].expand(-1, -1, d.shape[-1]), d)
        if layer.padding_idx is not None:
            w[:, layer.padding_idx] = 0
        return [w]
    return rows + ([bias] if getattr(layer, "bias", None) is not None else [])


_ROW_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.Embedding)


def _rows_apply(layer: torch.nn.Module, A: Tensor) -> bool:
    """Layers :func:`layer_rows` handles (others fall back to one batched backward)."""
    if isinstance(layer, torch.nn.Conv2d):
        return A.dim() == 4 and conv2d_supported(layer)
    if isinstance(layer, torch.nn.LayerNorm):
        return layer.elementwise_affine
    if isinstance(layer, torch.nn.Embedding):
        # also sparse=True (whose sparse gradients the batched backward cannot produce) and
        # max_norm (renormalised in place before the lookup, whose gradient is the same scatter)
        return A.dim() >= 1
    return A.dim() >= 2


def _refuse_empty(batch: Tensor) -> None:
    if batch.shape[0] == 0:
        raise CurvatureError("FisherNewton: the batch is empty (B = 0); there is nothing to fit")


def _refuse_interacting_samples(module: torch.nn.Module | None) -> None:
    """BatchNorm in training mode normalises each sample by statistics of the whole batch: the
    loss of one sample depends on the others, so per-sample gradients (and ``D``) are not
    defined — the layer rows and the batched backward would each compute something else."""
    if module is None:
        return
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.training:
            raise CurvatureError(
                f"FisherNewton: {name or 'the module'} ({type(layer).__name__}) is in training "
                "mode, which mixes the samples of a batch, so per-sample gradients are not "
                "defined. Put the BatchNorm layers in eval mode (layer.eval()), or use GroupNorm "
                "or LayerNorm."
            )


class _LayerCapture:
    """During the closure, record input and output of every layer of ``module`` that
    :func:`layer_rows` handles and whose parameters are being optimised.

    Only layers called exactly once per closure qualify (a shared or sequence-applied layer
    would need cross terms); the others fall back to materialised rows.
    """

    def __init__(self, module: torch.nn.Module | None, params: TensorList) -> None:
        self.module, self.ids = module, {id(p) for p in params}
        self.calls: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {}
        self.params: dict[torch.nn.Module, TensorList] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _LayerCapture:
        if self.module is None:
            return self
        for layer in self.module.modules():
            if isinstance(layer, _ROW_LAYERS) and id(layer.weight) in self.ids:
                # the parameters as the optimizer holds them (FSDP2 swaps in whole ones during
                # the forward pass)
                ps = [layer.weight]
                ps += [layer.bias] if getattr(layer, "bias", None) is not None else []
                self.params[layer] = ps
                self.handles.append(layer.register_forward_hook(self._record))
        return self

    def _record(self, layer, inputs, output) -> None:
        self.calls.setdefault(layer, []).append((inputs[0], output))

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def layers(self, batch: int) -> list[tuple[torch.nn.Module, Tensor, Tensor, TensorList]]:
        """Captured layers called once, on inputs and outputs with the batch as leading
        dimension (a position embedding of shape ``(1, L)`` is shared by all samples)."""
        out = []
        for layer, calls in self.calls.items():
            if len(calls) != 1 or not _rows_apply(layer, calls[0][0]):
                continue
            if calls[0][0].shape[0] != batch or calls[0][1].shape[0] != batch:
                continue
            (A, z), ps = calls[0], self.params[layer]
            if all(id(p) in self.ids for p in ps):
                out.append((layer, A.detach(), z, ps))
        return out


class FisherNewton(SecondOrderOptimizer):
    r"""Newton-type optimizer preconditioned by the empirical Fisher of the mini-batch.

    With per-sample losses ``ℓ_s``, ``s = 1..B``, per-sample gradients ``g_s``, ``g = mean_s g_s``
    and the empirical Fisher ``D = (1/B) Σ_s g_s g_sᵀ`` (rank ≤ B, never formed; see J. Martens,
    "New insights and perspectives on the natural gradient method", JMLR 2020, for what it is
    and is not), every mode solves with ``D`` plus a multiple of the identity by Woodbury over the
    ``B×B`` Gram matrix of the per-sample gradients:

    * ``damping_mode="relative"`` (default): ``c = damping · tr(D)/B`` and

      .. math:: x \leftarrow x - \mathrm{lr}\; c\,(D + cI)^{-1} g

      ``tr(D)/B = Σ_s ‖g_s‖²/B²`` is the mean of ``D``'s (at most ``B``) nonzero eigenvalues.
      Along every direction ``D`` does not see the step is exactly ``lr · g``; along an
      eigenvector of ``D`` with eigenvalue ``λ`` it is ``lr · g · c/(λ + c)``. **Rule: lr is the
      SGD learning rate along directions the Fisher does not see; damping is relative to the
      Fisher's mean nonzero eigenvalue** (dimensionless: large → SGD, small → closer to the
      natural-gradient step). An all-zero batch gives a zero step.
    * ``"fixed"``: the paper's formula ``x ← x − lr (D + αI)⁻¹ g`` with ``α = damping``
      (A. Semenov, "Rank-one approximation of the Hessian", 2025; ``D`` as the outer-product
      (Bartlett) approximation of the Hessian).
    * ``"theory"``: the same with ``α_k = sqrt(M‖g_k‖/2) + σ(x_k)``, the slides' ``σ`` bound on
      ``‖∇²f − D‖`` (:func:`fisher_sigma`; ``f`` is the mean loss of the batch).

    ``step(closure)``: the closure returns the 1-D tensor of per-sample losses
    ``ℓ_s = −log p(b_s | a_s, x)`` (e.g. ``cross_entropy(..., reduction="none")``) without calling
    ``backward``; per-sample gradients come from one batched backward (or, with ``module=``,
    from layer inputs and output gradients). ``step`` returns the mean loss and leaves ``g``
    in ``.grad``.

    Args:
        params: parameters or param groups; groups may set ``lr``, ``damping`` (relative in
            relative mode), ``momentum`` and ``weight_decay``.
        lr: step size (default 1.0; see the rule above). The defaults ``lr=1``, ``damping=2``
            were measured on digits MLPs and CNNs (batch 16-128) and a tiny BERT; there,
            training diverged from about ``lr=4`` (``damping=1`` to ``2``) or ``lr=3``
            (``damping=3``). The step is never longer than SGD's along any eigenvector of
            ``D``, so it tolerates a larger ``lr`` than SGD (which diverged at ``lr=1`` there).
            Tuning: if the loss is noisy or rises, divide ``lr`` by 3; raise ``damping`` to
            move towards SGD, lower it to move towards the natural gradient.
        damping: ``None`` picks the mode's default: ``2.0`` relative, ``1e-3`` fixed.
        damping_mode: ``"relative"`` (default), ``"fixed"`` or ``"theory"``.
        loss_type: ``"cross_entropy"`` (softmax) or ``"mse"`` (``ℓ_s = ½(φ_s − b_s)²``): selects
            the ``σ`` bound and, for ``fisher="true"``, the predictive distribution.
        hessian_lipschitz: ``M`` (theory mode). smoothness: ``L`` of the model outputs (theory,
            ``mse``). f_star: optimal mean loss ``f*`` (theory, ``mse``).
        fisher: ``"empirical"`` (data labels, the slides' method) or ``"true"``: the closure
            returns ``(outputs, targets)`` — logits ``(B, K)`` and class indices for
            cross-entropy, predictions and values for mse — and ``D`` uses labels sampled from
            the model (``Categorical(softmax)``, or ``N(φ, 1)``) with the optimizer's generator,
            while ``g`` uses the data labels.
        generator, process_group: as in :class:`RankOneNewton`. Distributed: per-sample rows
            are all-gathered, so ``D`` is the Fisher of the union batch.
        module: the model (recommended). Layers called once per step get their per-sample
            gradients from their inputs and output gradients: ``nn.Linear`` on ``(B, in)``
            implicitly (:class:`LinearRows`: the ``B×B`` Gram without ``B`` copies of the
            weights), ``nn.Conv2d`` from one batched product of input patches and output
            gradients (:class:`Conv2dRows`), and sequence ``nn.Linear``, ``nn.LayerNorm`` and
            ``nn.Embedding`` (:func:`layer_rows`). Other parameters use materialised per-sample
            gradients (one vmapped backward, much slower). Same result either way, for models
            whose samples do not interact: per-sample gradients are not defined when they do,
            so a ``module`` with BatchNorm in training mode is refused (``CurvatureError``).
        max_grad_norm: clip ``g`` as ``torch.nn.utils.clip_grad_norm_`` would, by
            ``min(1, max_grad_norm/(‖g‖ + 1e-6))`` (on device). The step is linear in ``g``, so
            this clips the step by the same factor. ``None``: no clipping.
        momentum: ``β``: the step preconditions the bias-corrected exponential average of the
            (clipped) gradients, ``m_t = β m_{t−1} + (1 − β) g_t``, ``m̂_t = m_t/(1 − β^t)``
            (``lr`` keeps its meaning). Default 0.
        weight_decay: decoupled (AdamW) decay ``x ← x(1 − lr·wd)`` before the step. Default 0.

    State: ``state["step"]``, ``state["skipped_steps"]``, ``state["damping"]`` (``c`` or ``α`` of
    the first group at the last step), per parameter ``"momentum_buffer"`` when ``momentum > 0``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_rankone import FisherNewton
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> opt = FisherNewton(model.parameters(), module=model)
        >>> first = nn.functional.cross_entropy(model(x), y).item()
        >>> for _ in range(30):  # per-sample losses, no backward()
        ...     loss = opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))
        >>> loss.item() < first
        True
    """

    _per_group = ("lr", "damping", "momentum", "weight_decay")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1.0,
        damping: float | None = None,
        damping_mode: str = "relative",
        loss_type: str = "cross_entropy",
        hessian_lipschitz: float | None = None,
        smoothness: float | None = None,
        f_star: float = 0.0,
        fisher: str = "empirical",
        *,
        generator: torch.Generator | None = None,
        process_group: Any = None,
        module: torch.nn.Module | None = None,
        max_grad_norm: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if damping is None:
            damping = _DEFAULT_RELATIVE_DAMPING if damping_mode == "relative" else 1e-3
        check_number("lr", lr)
        check_number("damping", damping)
        check_number("f_star", f_star)
        check_update_extras(weight_decay, momentum)
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, strict=True)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if damping_mode == "theory":
            if hessian_lipschitz is None:
                raise ValueError("damping_mode='theory' needs hessian_lipschitz (M)")
            check_number("hessian_lipschitz", hessian_lipschitz, strict=True)
            if loss_type == "mse":
                if smoothness is None:
                    raise ValueError(
                        "damping_mode='theory' with loss_type='mse' needs smoothness (L)"
                    )
                check_number("smoothness", smoothness, strict=True)
        if damping_mode != "theory" and damping <= 0:
            raise ValueError(
                f"FisherNewton needs damping > 0 in {damping_mode} mode: D has rank ≤ B < N, so "
                "D + αI is singular at α = 0"
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
            max_grad_norm=max_grad_norm,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        super().__init__(
            params, defaults, generator=generator, process_group=process_group, module=module
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        strict = group["damping_mode"] != "theory"
        check_number("param group damping", group["damping"], strict=strict)
        dtypes = {p.dtype for g in (self.param_groups[0], group) for p in g["params"]}
        if len(dtypes) > 1:
            raise TypeError(
                "FisherNewton needs every parameter in one dtype (the per-sample rows of all "
                f"layers enter one B×B Gram matrix), got {sorted(map(str, dtypes))}"
            )

    def _step(self, closure: Callable[[], Any] | None) -> Tensor | None:
        """One FisherNewton step; returns the mean of the closure's per-sample losses."""
        groups = self._begin_step()
        if closure is None:
            raise CurvatureError(
                "FisherNewton needs per-sample losses: opt.step(closure) with a closure that "
                "returns the 1-D tensor of per-sample losses (reduction='none') without calling "
                "backward()."
            )
        params = [p for ps in groups for p in ps]
        if not params:
            return None
        defaults = self.param_groups[0]
        self._check_health(self._next_call())
        self._sync_generator(params[0])
        _refuse_interacting_samples(self.module)
        with _LayerCapture(self.module, params) as capture:
            losses, fisher_losses = self._per_sample_losses(closure, params, defaults)
        rows_losses = losses if fisher_losses is None else fisher_losses
        if self._sharded and fisher_losses is not None:
            raise CurvatureError(
                "FisherNewton: fisher='true' needs the data-label gradient by autograd.grad, "
                "which does not reach FSDP2's sharded parameters; use fisher='empirical'"
            )
        with torch.enable_grad():
            blocks = self._blocks(
                rows_losses,
                params,
                capture,
                keep_graph=fisher_losses is not None,
                sharded=self._sharded,
            )
            if fisher_losses is None:  # g = mean of the rows
                ones = torch.full_like(rows_losses, 1.0 / rows_losses.shape[0]).detach()
                g_by_id = {id(p): t for blk in blocks for p, t in zip(blk.params, blk.vjp(ones))}
            else:  # g from the data labels
                grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
                # a parameter the outputs do not depend on has no gradient: zero (below)
                g_by_id = {id(p): gp for p, gp in zip(params, grads) if gp is not None}
        g_local = [g_by_id.get(id(p), torch.zeros_like(p)) for p in params]
        loss_local = losses.detach().mean()
        if self._layout.kind != "single":
            # Ranks may hold different batch sizes: all_gather needs equal shapes, and the union
            # batch's mean weights rank r's mean by B_r/B (1 for equal sizes). One small
            # all_gather and one host sync per step, for the shapes.
            sizes = self._batch_sizes(losses.shape[0], losses.device)
            weight = len(sizes) * losses.shape[0] / sum(sizes)
            if weight != 1.0:
                g_local = [t * weight for t in g_local]
                loss_local = loss_local * weight
            blocks = [blk.gather(lambda rows: self._gather_rows(rows, sizes)) for blk in blocks]
        if self._sharded:
            # g of the union batch from its rows, then this rank's pieces; the direction is
            # formed on whole parameter-shaped tensors from pieces embedded in zeros, whose
            # row products J_t m_t are partial sums over the ranks (one all-reduce of B numbers)
            ones = torch.full((blocks[0].batch,), 1.0 / blocks[0].batch, dtype=params[0].dtype)
            whole = {id(p): t for blk in blocks for p, t in zip(blk.params, blk.vjp(ones))}
            g_local = [shard_of(whole[id(p)], p) for p in params]
        g = self._clip(self._average(g_local), defaults.get("max_grad_norm"))
        m = self._momentum_gradient(groups, g)
        m_by_id = {id(p): embed_shard(mp, p) for p, mp in zip(params, m)}
        batch = blocks[0].batch
        loss = self._mean_loss(loss_local)
        grams = [blk.gram() for blk in blocks]
        c_groups = self._damping(g, loss, defaults, grams, batch)
        c_by_id = {id(p): c for c, ps in zip(c_groups, groups) for p in ps}
        # relative mode takes c·(D + cI)⁻¹: exactly lr·g along what D does not see
        y, solved = fisher_newton_direction(
            blocks,
            m_by_id,
            c_by_id,
            batch,
            grams,
            times_damping=defaults["damping_mode"] == "relative",
            sum_partial=sum_over_shards if self._sharded else None,
        )
        ok = solved & all_finite(loss, torch.stack(c_groups))
        self._apply_masked(groups, [[shard_of(y[id(p)], p) for p in ps] for ps in groups], ok)
        self.global_state["damping"] = c_groups[0].detach()
        self._detach_grads(params, g)
        return loss

    @staticmethod
    def _clip(g: TensorList, max_norm: float | None) -> TensorList:
        """``g · min(1, max_norm/(‖g‖ + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` (on
        device). The step is linear in ``g``, so this clips the step the same way."""
        if max_norm is None:
            return g
        return torch._foreach_mul(g, (max_norm / (norm(g) + 1e-6)).clamp(max=1.0))

    @staticmethod
    def _blocks(
        losses: Tensor,
        params: TensorList,
        capture: _LayerCapture,
        *,
        keep_graph: bool,
        sharded: bool = False,
    ) -> list[PerSampleRows]:
        """Implicit rows for captured ``nn.Linear`` layers on ``(B, in)``, rows from the layer
        outputs' gradients for the other captured layers, and one batched backward (``B``
        vmapped backward passes) for the rest."""
        layers = capture.layers(losses.shape[0])
        blocks: list[PerSampleRows] = []
        covered = {id(p) for _, _, _, ps in layers for p in ps}
        rest = [p for p in params if id(p) not in covered]
        if rest and sharded:
            raise CurvatureError(
                f"FisherNewton under FSDP2 takes per-sample gradients from layer inputs and "
                f"output gradients only (module= with nn.Linear, nn.Conv2d, nn.LayerNorm, "
                f"nn.Embedding layers called once per step); {len(rest)} parameter(s) are not "
                "in such a layer, and the batched backward cannot reach sharded parameters"
            )
        if layers:
            # δ_s = ∂ℓ_s/∂z_s: samples do not interact, so one backward of Σ ℓ_s gives them all
            deltas = torch.autograd.grad(
                losses.sum(),
                [out for _, _, out, _ in layers],
                retain_graph=bool(rest) or keep_graph,
                allow_unused=True,
            )
            for (layer, A, out, ps), D in zip(layers, deltas):
                D = torch.zeros_like(out) if D is None else D.detach()
                if A.is_floating_point():  # autocast: rows in the parameters' dtype
                    A, D = A.to(ps[0].dtype), D.to(ps[0].dtype)
                if isinstance(layer, torch.nn.Linear) and A.dim() == 2:
                    blocks.append(LinearRows(ps, A, D))  # the B×B Gram without the rows
                elif isinstance(layer, torch.nn.Conv2d):
                    blocks.append(Conv2dRows.from_layer(layer, A, D))
                else:
                    blocks.append(PerSampleRows(ps, layer_rows(layer, A, D)))
        if rest:
            blocks.append(
                PerSampleRows(rest, per_sample_grads(losses, rest, retain_graph=keep_graph))
            )
        return blocks

    def _per_sample_losses(self, closure, params, defaults) -> tuple[Tensor, Tensor | None]:
        before = grad_snapshot(params)
        with torch.enable_grad():
            out = closure()
        if grads_written(params, before):
            raise CurvatureError(
                "FisherNewton: the closure called backward(); return the per-sample losses "
                "(reduction='none') without calling backward — the optimizer differentiates them"
            )
        if defaults["fisher"] == "true":
            if not (isinstance(out, tuple) and len(out) == 2):
                raise CurvatureError(
                    "fisher='true': the closure must return (outputs, targets) — logits and "
                    "class indices for cross_entropy, predictions and values for mse"
                )
            outputs, targets = out
            _refuse_empty(outputs)
            return self._true_fisher_losses(outputs, targets, defaults["loss_type"])
        if not isinstance(out, Tensor) or out.dim() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise CurvatureError(
                "FisherNewton: the closure must return a 1-D tensor of per-sample losses "
                f"(use reduction='none'), got {shape}"
            )
        _refuse_empty(out)
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
                # drawn on the generator's device (the parameters', for the owned one)
                probs = outputs.detach().softmax(-1).to(self.generator.device, torch.float64)
                # non-finite logits (the step will be skipped): any valid distribution will do
                probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, 1.0)
                sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
                model_losses = torch.nn.functional.cross_entropy(
                    outputs, sampled.to(outputs.device), reduction="none"
                )
            else:
                pred = outputs.reshape(outputs.shape[0], -1)
                losses = 0.5 * (pred - targets.reshape(pred.shape)).pow(2).sum(1)
                noise = torch.randn(
                    pred.shape,
                    generator=self.generator,
                    dtype=pred.dtype,
                    device=self.generator.device,
                )
                model_losses = 0.5 * (pred - (pred.detach() + noise.to(pred.device))).pow(2).sum(1)
        return losses, model_losses

    def _batch_sizes(self, local: int, device: torch.device) -> list[int]:
        """Every rank's batch size, in rank order."""
        world = dist.get_world_size(self._layout.group)
        mine = torch.tensor([local], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=self._layout.group)
        return torch.cat(parts).tolist()

    def _gather_rows(self, per_sample: TensorList, sizes: list[int]) -> TensorList:
        """All ranks' rows (per-sample gradients or layer inputs/output gradients), stacked in
        rank order, so ``D`` is the Fisher of the union batch; ``sizes``: rows per rank."""
        world = len(sizes)
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in per_sample], dim=1).contiguous()
        if flat.shape[0] < max(sizes):  # all_gather needs equal shapes: pad with zero rows
            flat = torch.cat([flat, flat.new_zeros(max(sizes) - flat.shape[0], flat.shape[1])])
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat, group=self._layout.group)
        rows = torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)
        out, offset = [], 0
        for t in per_sample:
            width = t[0].numel()
            out.append(rows[:, offset : offset + width].reshape(rows.shape[0], *t.shape[1:]))
            offset += width
        return out

    def _damping(
        self, g: TensorList, loss: Tensor, defaults: dict, grams: list[list[Tensor]], batch: int
    ) -> list[Tensor]:
        """``α`` (fixed, theory) or ``c = damping · tr(D)/B`` (relative) per group, on device."""
        device, dtype = g[0].device, g[0].dtype
        mode = defaults["damping_mode"]
        if mode in ("fixed", "relative"):
            scale = torch.ones((), dtype=torch.float64, device=device)
            if mode == "relative":  # tr(D)/B = Σ_s ‖g_s‖²/B², the mean of D's nonzero eigenvalues
                trace = sum(gm.diagonal().sum(dtype=torch.float64) for gms in grams for gm in gms)
                scale = (trace / batch**2).clamp_min(torch.finfo(dtype).tiny)
            cache: dict[float, Tensor] = {}
            return [
                cache.setdefault(grp["damping"], (grp["damping"] * scale).to(device, dtype))
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
