"""Influence functions: how much a training point moves the loss on a test point.

Koh & Liang (ICML 2017), after Cook & Weisberg (1982): for the training objective
``P(θ) = (1/n) Σ_i ℓ(z_i; θ) + (w/2)‖θ‖²`` at its minimiser ``θ̂`` with Hessian ``H``,

    I(z, z_test) = −∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z),

the derivative of the test loss when ``z`` is up-weighted by ``ε``. Removing ``z`` (``ε = −1/n``)
changes the test loss by about ``−I/n``. ``s_test = (H + λI)⁻¹ ∇ℓ(z_test)`` is computed once per
test point with an inverse-HVP method of :mod:`torch_rankone.linalg`, then every training point
is scored by one dot product with its (vectorised, chunked) per-sample gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from . import linalg
from ._tensorlist import flatten, unflatten
from .curvature import functional_per_sample_grads

__all__ = ["influence", "METHODS"]

METHODS = ("exact", "cg", "neumann", "lissa")


def influence(
    model: torch.nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    damping: float = 0.0,
    weight_decay: float = 0.0,
    method: str = "cg",
    params: Sequence[str] | None = None,
    batch_size: int = 1024,
    progress: bool = False,
    generator: torch.Generator | None = None,
    **solver_options: Any,
) -> Tensor:
    """Influence of every training point on every test loss, shape ``(n_test, n_train)``.

    Args:
        model: the trained model (evaluated at its current parameters ``θ̂``).
        loss_fn: ``loss_fn(outputs, targets)`` → per-sample losses, shape ``(B,)``.
        train, test: ``(inputs, targets)`` with the sample dimension first.
        damping: ``λ`` added to the Hessian (keeps ``H + λI`` positive definite off the optimum).
        weight_decay: ``w`` of the training objective's ``(w/2)‖θ‖²`` term (part of ``H``).
        method: ``"exact"`` (dense Hessian and solve; small models only), ``"cg"``,
            ``"neumann"`` or ``"lissa"`` (mini-batch HVPs of ``batch_size`` rows).
        params: names of the parameters to differentiate (default: all that require grad).
        batch_size: rows per chunk for Hessian-vector products and per-sample gradients.
        progress: show a progress bar while scoring the training points (needs ``tqdm``,
            installed with the ``examples`` extra; without it there is no bar).
        generator: random source for LiSSA's mini-batches.
        solver_options: passed to the solver — ``cg``: ``max_iters``, ``rtol``; ``neumann``:
            ``num_terms`` (default 100), ``scale``; ``lissa``: ``depth`` (default 1000),
            ``repeats``, ``scale`` (required).

    Returns:
        ``I[t, i] = −∇ℓ(test_t)ᵀ (H + λI)⁻¹ ∇ℓ(train_i)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, (X, y) in (("train", train), ("test", test)):
        if X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise ValueError(f"{name}: inputs and targets need the same, nonzero sample count")
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if params is not None:
        missing = set(params) - set(named)
        if missing:
            raise ValueError(f"unknown or frozen parameters: {sorted(missing)}")
        named = {n: named[n] for n in params}
    names, theta = list(named), list(named.values())

    def sample_loss(ps: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return loss_fn(functional_call(model, ps, (x.unsqueeze(0),)), t.unsqueeze(0)).sum()

    def objective(flat_theta: Tensor, rows: Tensor | None = None) -> Tensor:
        ps = dict(zip(names, unflatten(flat_theta, theta)))
        X, y = train if rows is None else (train[0][rows], train[1][rows])
        total = sum(
            loss_fn(
                functional_call(model, ps, (X[i : i + batch_size],)), y[i : i + batch_size]
            ).sum()
            for i in range(0, X.shape[0], batch_size)
        )
        return total / X.shape[0] + 0.5 * weight_decay * flat_theta.dot(flat_theta)

    x0 = flatten(theta)
    test_grads = _rows(functional_per_sample_grads(sample_loss, named, *test), names)
    s_test = _inverse_hvps(
        objective, x0, test_grads, train, method, damping, batch_size, generator, solver_options
    )
    scores = []
    chunks = range(0, train[0].shape[0], batch_size)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional (extra "examples"): no bar then
            tqdm = None
        if tqdm is not None:
            chunks = tqdm(chunks, desc="scoring training points", unit="chunk")
    for i in chunks:
        chunk = (train[0][i : i + batch_size], train[1][i : i + batch_size])
        J = _rows(functional_per_sample_grads(sample_loss, named, *chunk), names)
        scores.append(-(s_test @ J.T))
    return torch.cat(scores, dim=1)


def _rows(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    """Per-sample gradient dict ``{name: (B, *shape)}`` → matrix ``(B, N)``."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)


def _inverse_hvps(objective, x0, V, train, method, damping, batch_size, generator, options):
    """``(H + λI)⁻¹ v`` for every row ``v`` of ``V``."""
    if method == "exact":
        H = torch.autograd.functional.hessian(objective, x0)
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        return torch.linalg.solve(H + damping * eye, V.T).T

    def full_hvp(v: Tensor) -> Tensor:
        return torch.func.jvp(torch.func.grad(objective), (x0,), (v,))[1]

    if method == "cg":  # per test point: CG's step sizes are per right-hand side
        opts = {"max_iters": options.get("max_iters"), "rtol": options.get("rtol", 1e-10)}
        return torch.stack([linalg.cg_ihvp(full_hvp, v, damping, **opts) for v in V])
    # The Neumann recursion is linear, so all test points go through it at once as one vector of
    # the block-diagonal operator I ⊗ H (same spectrum, so the divergence checks stay valid),
    # with one vmapped HVP per term.
    if method == "neumann":
        K, scale = options.get("num_terms", 100), options.get("scale")
        return linalg.neumann_ihvp(torch.func.vmap(full_hvp), V, K, scale, damping)
    if "scale" not in options:
        raise ValueError("method='lissa' needs scale= (a bound on the mini-batch Hessians)")
    n = train[0].shape[0]

    def batch_hvp(V: Tensor) -> Tensor:  # one mini-batch shared by all test points
        rows = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(V.device)
        grad_batch = torch.func.grad(lambda z: objective(z, rows))
        return torch.func.vmap(lambda v: torch.func.jvp(grad_batch, (x0,), (v,))[1])(V)

    return linalg.lissa_ihvp(
        batch_hvp,
        V,
        depth=options.get("depth", 1000),
        scale=options["scale"],
        damping=damping,
        repeats=options.get("repeats", 1),
    )
