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
        model: the trained model (evaluated at its current parameters ``θ̂``) in evaluation mode:
            batch normalisation and dropout must not be in training mode (call ``model.eval()``).
        loss_fn: ``loss_fn(outputs, targets)`` → per-sample losses, shape ``(B,)``, e.g.
            ``F.cross_entropy(out, t, reduction="none")``. A batch-averaged (scalar) loss is
            refused for batches of more than one sample: it would divide ``H`` by the batch size
            and multiply every score by it.
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
            ``num_terms`` (default 100), ``scale``, ``rtol`` (warning threshold, default 1e-3);
            ``lissa``: ``depth`` (default 1000), ``repeats``, ``scale`` (required).

    Returns:
        ``I[t, i] = −∇ℓ(test_t)ᵀ (H + λI)⁻¹ ∇ℓ(train_i)``.

    Raises:
        ValueError: on a batch-averaged ``loss_fn`` or a model whose batch normalisation or
            dropout is in training mode (the model is left as it was).
        RuntimeError: when a forward pass mutates a buffer or draws random numbers (other
            training-mode side effects), which ``torch.func`` cannot differentiate.

    Warns:
        RuntimeWarning: when ``"cg"`` stops at ``max_iters`` (default ``min(N, 1000)`` per test
            point) or the ``"neumann"`` series is estimated to be off by more than its ``rtol``.
            A singular ``H`` (``damping=0`` with a redundant parametrisation, e.g. softmax's
            class shift or an over-parametrised network) makes CG run to ``max_iters`` for every
            test point: add damping, or use ``"exact"`` for small models.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_eval_mode(model)
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
            _per_sample(loss_fn(functional_call(model, ps, (Xb,)), yb), Xb.shape[0]).sum()
            for Xb, yb in zip(X.split(batch_size), y.split(batch_size))
        )
        return total / X.shape[0] + 0.5 * weight_decay * flat_theta.dot(flat_theta)

    x0 = flatten(theta)
    try:
        test_grads = _rows(functional_per_sample_grads(sample_loss, named, *test), names)
        s_test = _inverse_hvps(
            objective, x0, test_grads, train, method, damping, batch_size, generator, solver_options
        )
    except RuntimeError as exc:
        # torch.func refuses in-place updates of captured buffers (running statistics) and
        # random ops under vmap: both mean a layer left in training mode.
        what = {"captured Tensor": "updates a buffer", "random operation": "draws random numbers"}
        found = [text for key, text in what.items() if key in str(exc)]
        if not found:
            raise
        raise RuntimeError(
            f"influence: the model's forward pass {found[0]}, which torch.func cannot "
            "differentiate (a training-mode side effect?); call model.eval() first"
        ) from exc
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


# Layers whose training mode changes the forward pass (batch statistics, random masks).
_MODE_DEPENDENT = (torch.nn.modules.batchnorm._NormBase, torch.nn.modules.dropout._DropoutNd)


def _check_eval_mode(model: torch.nn.Module) -> None:
    """Refuse layers in training mode: influence is about the deterministic trained model."""
    bad = [
        f"{name or 'model'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if m.training
        and isinstance(m, _MODE_DEPENDENT)
        and getattr(m, "track_running_stats", True)
        and getattr(m, "p", 1) > 0
    ]
    if bad:
        raise ValueError(
            f"influence: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
            "in training mode (batch statistics, random dropout); call model.eval() first"
        )


def _per_sample(losses: Tensor, batch: int) -> Tensor:
    """``losses`` if ``loss_fn`` kept one loss per sample; a batch mean would scale ``H`` by
    ``1/batch`` and the scores by ``batch``, so it is refused (one row is unambiguous)."""
    if batch > 1 and (losses.ndim == 0 or losses.shape[0] != batch):
        raise ValueError(
            f"influence: loss_fn returned shape {tuple(losses.shape)} for a batch of {batch} "
            f"samples; it must return one loss per sample, shape ({batch},). Pass "
            "reduction='none', e.g. F.cross_entropy(out, t, reduction='none')."
        )
    return losses


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
        rtol = options.get("rtol", 1e-3)  # only the threshold of the truncation warning
        return linalg.neumann_ihvp(torch.func.vmap(full_hvp), V, K, scale, damping, rtol=rtol)
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
