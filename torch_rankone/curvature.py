"""Curvature primitives: Hessian-vector products, per-sample gradients, the top eigenvalue.

Notation: ``x`` is the concatenation of all parameters, ``H = ∇²f(x)``. Vectors are
lists of tensors shaped like the parameters (or the same pytree as the parameters for the
``torch.func`` entry points), so no ``N``-sized flat copy is ever made.

Two exact HVP paths:

* :func:`hvp` — forward-over-reverse, ``jvp(grad(f), (x,), (v,))``, for a pure function ``f``
  of a tuple/dict of tensors (``torch.func``). One forward-mode pass over the backward graph.
* :func:`graph_hvp` — reverse-over-reverse (Pearlmutter, 1994): given ``g = ∇f`` built with
  ``create_graph=True``, ``Hv = ∇(gᵀv)``. This is what the optimizers use on ``.grad`` tensors
  carrying a graph, or on gradients they take from a loss closure.

References: B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation
6(1), 1994.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._tensorlist import TensorList, dot, norm, randn_like
from ._warnings import warn_at_caller

__all__ = [
    "hvp",
    "graph_hvp",
    "graph_hvp_fn",
    "per_sample_grads",
    "functional_per_sample_grads",
    "power_iteration",
    "PowerIterationResult",
    "lambda_max",
]

HVPFn = Callable[[TensorList], TensorList]


def hvp(f: Callable[[Any], Tensor], params: Any, v: Any) -> Any:
    """Hessian-vector product ``H v`` by forward-over-reverse differentiation.

    Args:
        f: maps ``params`` (a tensor, tuple or dict of tensors) to a scalar tensor.
        params: the point ``x`` at which the Hessian is taken.
        v: the direction, with the same structure and shapes as ``params``.

    Returns:
        ``∇²f(params) v`` with the structure of ``params``.
    """
    p_leaves, p_spec = torch.utils._pytree.tree_flatten(params)
    v_leaves, v_spec = torch.utils._pytree.tree_flatten(v)
    if p_spec != v_spec:
        raise ValueError(f"hvp: v has structure {v_spec}, params have {p_spec}")
    for i, (p, u) in enumerate(zip(p_leaves, v_leaves)):
        if p.shape != u.shape:
            raise ValueError(
                f"hvp: v leaf {i} has shape {tuple(u.shape)}, expected {tuple(p.shape)}"
            )
    _, out = torch.func.jvp(torch.func.grad(f), (params,), (v,))
    return out


def graph_hvp(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    v: Sequence[Tensor],
    *,
    retain_graph: bool = True,
) -> TensorList:
    """Hessian-vector product by reverse-over-reverse: ``Hv = ∇_x (gᵀ v)``.

    Args:
        grads: ``∇f(x)``, one tensor per parameter, computed with ``create_graph=True``.
        params: the parameters the gradients were taken with respect to.
        v: the direction, one tensor per parameter.
        retain_graph: keep the double-backward graph for further products (default ``True``,
            since solvers take several products at the same point).

    Returns:
        ``H v`` as a list of parameter-shaped tensors. Parameters on which the gradient does not
        depend (e.g. a bias of a linear loss) get zeros. Gradients that carry no graph at all
        (taken without ``create_graph=True``) therefore give ``H v = 0``: the optimizers check for a
        graph before choosing this path.
    """
    if not (len(grads) == len(params) == len(v)):
        raise ValueError(
            f"graph_hvp: {len(grads)} gradients, {len(params)} parameters, {len(v)} directions"
        )
    # A gradient entry without a graph is constant in x, so it contributes nothing to Hv.
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad(
        [grads[i] for i in live],
        list(params),
        grad_outputs=[v[i] for i in live],
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]


def graph_hvp_fn(loss: Tensor, params: Sequence[Tensor]) -> tuple[TensorList, HVPFn]:
    """Differentiate ``loss`` once with a graph and return ``(grads, v ↦ H v)``.

    The returned ``grads`` still carry their graph; detach them for use as a plain gradient.
    Each call of the returned function costs one double-backward pass.
    """
    if loss.dim() != 0:
        raise ValueError(f"graph_hvp_fn: loss must be a scalar, got shape {tuple(loss.shape)}")
    params = list(params)
    grads = list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return grads, lambda v: graph_hvp(grads, params, v)


def per_sample_grads(
    losses: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
) -> TensorList:
    """Per-sample gradients ``∇ℓ_s`` of a 1-D tensor of per-sample losses.

    Vectorised: one batched backward (``autograd.grad(..., is_grads_batched=True)``, which vmaps
    the backward pass over the rows of the identity), never a Python loop over samples.

    Args:
        losses: shape ``(B,)``, with a graph to ``params``.
        params: the parameters.
        retain_graph: keep the graph of ``losses`` (e.g. to also take ``∇ mean(losses)``).

    Returns:
        One tensor per parameter of shape ``(B, *p.shape)``; row ``s`` is ``∂ℓ_s/∂p``. This is the
        exact derivative of ``ℓ_s`` as computed; it equals the gradient of the sample's loss taken
        alone whenever samples do not interact in the forward pass (no batch statistics).
    """
    if losses.dim() != 1:
        raise ValueError(
            f"per_sample_grads: losses must be a 1-D tensor of per-sample losses, "
            f"got shape {tuple(losses.shape)}"
        )
    if not losses.requires_grad:
        raise ValueError("per_sample_grads: losses do not require grad (no graph to the params)")
    params = list(params)
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(
        losses,
        params,
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    B = losses.shape[0]
    return [p.new_zeros((B, *p.shape)) if g is None else g for g, p in zip(grads, params)]


def functional_per_sample_grads(loss_fn: Callable[..., Tensor], params: Any, *batch: Tensor) -> Any:
    """Per-sample gradients of a functional loss, ``vmap(grad(loss_fn))`` over the batch.

    Args:
        loss_fn: ``loss_fn(params, *sample) -> scalar`` for ONE sample (the batch dimension is
            removed by vmap; use ``torch.func.functional_call`` for an ``nn.Module``).
        params: tensor, tuple or dict of tensors (not batched).
        batch: tensors whose first dimension ``B`` indexes samples.

    Returns:
        The structure of ``params`` with a leading ``B`` dimension on every leaf.
    """
    if not batch:
        raise ValueError("functional_per_sample_grads: pass at least one batched tensor")
    sizes = {t.shape[0] if t.dim() else None for t in batch}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "functional_per_sample_grads: batch tensors must share a leading batch dimension, "
            f"got shapes {[tuple(t.shape) for t in batch]}"
        )
    in_dims = (None,) + (0,) * len(batch)
    return torch.func.vmap(torch.func.grad(loss_fn), in_dims=in_dims)(params, *batch)


class PowerIterationResult(NamedTuple):
    """Outcome of :func:`power_iteration`."""

    eigenvalue: Tensor  # 0-d, the Rayleigh quotient at the last iterate (signed)
    eigenvector: TensorList  # unit norm over all tensors
    num_iters: int
    residual: float  # ‖H v − λ v‖ / |λ| at the last iterate
    converged: bool


def power_iteration(
    hvp_fn: HVPFn,
    like: Sequence[Tensor],
    *,
    max_iters: int = 100,
    tol: float = 1e-6,
    init: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
    raise_nonfinite: bool = True,
) -> PowerIterationResult:
    """Largest-magnitude eigenpair of the symmetric operator ``hvp_fn`` by power iteration.

    Iterates ``v ← Hv/‖Hv‖`` and stops when the relative residual ``‖Hv − λv‖/|λ|`` drops below
    ``tol``; for a symmetric operator the eigenvalue error is then about ``tol²·|λ|/gap``. One
    HVP per iteration; each convergence test is a host synchronisation (this is a set-up routine,
    not part of an optimizer's per-step hot path).

    Args:
        hvp_fn: ``v ↦ H v`` on lists of parameter-shaped tensors.
        like: parameter-shaped tensors (shapes, dtype, device of the vectors).
        max_iters: HVP budget.
        tol: relative residual at which to stop.
        init: starting vector (default: Gaussian from ``generator``).
        generator: random source for the default start.
        warn: emit a ``RuntimeWarning`` when ``max_iters`` is reached before ``tol``.
        raise_nonfinite: raise ``FloatingPointError`` when the HVP returns non-finite values;
            ``False`` returns a NaN eigenvalue instead (the optimizers then skip the step).
    """
    if max_iters < 1:
        raise ValueError(f"power_iteration: max_iters must be >= 1, got {max_iters}")
    if not tol > 0:
        raise ValueError(f"power_iteration: tol must be > 0, got {tol}")
    v = list(init) if init is not None else randn_like(like, generator)
    v = torch._foreach_div(v, norm(v))
    lam, residual = torch.zeros(()), math.inf
    for it in range(1, max_iters + 1):
        hv = hvp_fn(v)
        hv_norm = norm(hv)
        if not torch.isfinite(hv_norm):
            if raise_nonfinite:
                raise FloatingPointError("power_iteration: the HVP returned non-finite values")
            return PowerIterationResult(torch.full_like(hv_norm, math.nan), v, it, math.inf, False)
        lam = dot(v, hv)
        if hv_norm == 0:  # v is in the null space; for a zero operator 0 is the answer
            return PowerIterationResult(lam, v, it, 0.0, True)
        residual_vec = torch._foreach_sub(hv, torch._foreach_mul(v, lam))
        # λ = 0 with Hv ≠ 0 (v orthogonal to Hv) divides by zero: inf, never converged
        residual = float(norm(residual_vec) / lam.abs())
        if residual <= tol:
            return PowerIterationResult(lam, v, it, residual, True)
        v = torch._foreach_div(hv, hv_norm)
    if warn:  # at the user's line, also when called through lambda_max
        warn_at_caller(
            f"power_iteration: not converged after {max_iters} iterations (relative residual "
            f"{residual:.2e} > tol {tol:.1e}); the eigenvalue {float(lam):.6g} may be "
            "underestimated. Raise max_iters, or the top two eigenvalues are nearly equal "
            "in magnitude.",
            RuntimeWarning,
        )
    return PowerIterationResult(lam, v, max_iters, residual, False)


def lambda_max(
    hvp_fn: HVPFn,
    like: Sequence[Tensor],
    *,
    max_iters: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Largest-magnitude eigenvalue of ``H`` (signed, 0-d tensor) by :func:`power_iteration`."""
    return power_iteration(
        hvp_fn, like, max_iters=max_iters, tol=tol, generator=generator
    ).eigenvalue
