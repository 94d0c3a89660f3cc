"""The generalised linear model (GLM) problem that NewtonLearn and its baselines solve.

``N`` rows ``(a_j, b_j)`` (split over ``n`` nodes of ``m`` rows each by the distributed methods),

    P(x) = (1/N) Σ_j φ(a_jᵀx, b_j) + (λ/2)‖x‖²,
    ∇P(x) = (1/N) Σ_j φ'(a_jᵀx, b_j) a_j + λx,   ∇²P(x) = (1/N) Σ_j φ''(a_jᵀx, b_j) a_j a_jᵀ + λI,

with the loss ``φ`` logistic (``b = ±1``), squared, or a user's function (derivatives by
``torch.func``). This module owns the losses and their derivatives (:func:`glm_loss`), a node's
feature shard (:class:`GLMShard`: dense or CSR products, gathered rows), the node terms, the data
checks, and exact Newton (:func:`glm_newton`, which gives ``P*``).

Reference: R. Islamov, X. Qian, P. Richtárik, "Distributed second order methods with fast rates
and compressed communication", ICML 2021, eq. (1).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .linalg import newton_direction, shifted

__all__ = [
    "GLMFit",
    "GLMLoss",
    "GLMShard",
    "data_error",
    "glm_fit",
    "glm_loss",
    "glm_newton",
    "glm_node_terms",
]

SPARSE_DENSITY = 0.25  # below this fraction of nonzeros the matvecs go through CSR copies


class GLMLoss(NamedTuple):
    """``φ``, ``φ'``, ``φ''`` (elementwise in the margin ``t`` and label ``b``); ``gamma`` =
    sup|φ''| and ``nu`` = sup|φ'''| where known (``None`` for a custom loss)."""

    value: Callable[[Tensor, Tensor], Tensor]
    d1: Callable[[Tensor, Tensor], Tensor]
    d2: Callable[[Tensor, Tensor], Tensor]
    gamma: float | None
    nu: float | None


def _logistic(t: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.softplus(-b * t)


def _squared(t: Tensor, b: Tensor) -> Tensor:
    return 0.5 * (t - b) ** 2


_BUILTIN = {
    # φ = log(1 + e^{−bt}); φ' = −b σ(−bt); φ'' = b² σ(bt) σ(−bt) ≤ 1/4 (b = ±1);
    # |φ'''| = |σ(1−σ)(1−2σ)| ≤ 1/(6√3)
    "logistic": GLMLoss(
        _logistic,
        lambda t, b: -b * torch.sigmoid(-b * t),
        lambda t, b: b * b * torch.sigmoid(b * t) * torch.sigmoid(-b * t),
        0.25,
        1.0 / (6.0 * math.sqrt(3.0)),
    ),
    "squared": GLMLoss(_squared, lambda t, b: t - b, lambda t, b: torch.ones_like(t + b), 1.0, 0.0),
}


def glm_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> GLMLoss:
    """``"logistic"``, ``"squared"`` (closed forms) or a twice-differentiable scalar function
    ``φ(t, b)`` of torch scalars, whose ``φ'`` and ``φ''`` come from ``torch.func``
    (``vmap(grad(φ))``, ``vmap(grad(grad(φ)))``) and are applied elementwise."""
    if isinstance(loss, str):
        if loss not in _BUILTIN:
            raise ValueError(f"loss must be one of {sorted(_BUILTIN)} or a callable, got {loss!r}")
        return _BUILTIN[loss]
    if not callable(loss):
        raise TypeError(f"loss must be a string or a callable phi(t, b), got {type(loss).__name__}")
    from torch.func import grad, vmap

    d1 = grad(loss)
    return GLMLoss(vmap(loss), vmap(d1), vmap(grad(d1)), None, None)


class GLMShard:
    """A node-side feature matrix for the matrix products and the rows of the learning messages.

    Dense input keeps the dense rows (gathered for the Hessian updates) and, when sparse enough,
    CSR copies of ``A`` and ``Aᵀ`` for the products (w8a is 4 % dense: about 20× faster margins
    and gradients than dense products). Sparse CSR/COO input below that density stays sparse
    (``A`` and ``Aᵀ`` in CSR, no dense copy): the few rows a step sends are gathered from the
    CSR arrays. Sparse input at or above it is densified once, where dense products are faster
    and cost at most about twice the CSR's memory.
    """

    def __init__(self, A: Tensor) -> None:
        self.A: Tensor | None = None
        self.csr = self.csr_t = None
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            if A.layout == torch.sparse_coo:
                A = A.coalesce().to_sparse_csr()  # duplicates add up, as in to_dense()
            if A.layout == torch.sparse_csr:
                if A.values().numel() < SPARSE_DENSITY * max(A.numel(), 1):
                    self.csr, self.csr_t = A, A.t().to_sparse_csr()
                    return
                A = A.to_dense()
            self.A = A.contiguous()
            density = float((A != 0).sum()) / max(A.numel(), 1)
            if density < SPARSE_DENSITY:
                self.csr = self.A.to_sparse_csr()
                self.csr_t = self.A.T.contiguous().to_sparse_csr()

    def mv(self, x: Tensor) -> Tensor:
        """``A x``."""
        return (self.csr if self.csr is not None else self.A) @ x

    def rmm(self, W: Tensor) -> Tensor:
        """``Aᵀ W`` for a vector or matrix ``W``."""
        return self.csr_t @ W if self.csr_t is not None else self.A.T @ W

    def _entry_rows(self) -> Tensor:
        """The row of each stored entry of the CSR copy."""
        crow = self.csr.crow_indices()
        return torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff())

    @property
    def num_rows(self) -> int:
        return (self.A if self.A is not None else self.csr).shape[0]

    def weighted_gram(self, w: Tensor) -> Tensor:
        """``Aᵀ diag(w) A`` (a node's local Hessian model). Sparse data: a sparse × sparse
        product, ``Σ_j nnz(a_j)²`` multiply-adds instead of the dense ``N d²`` (a9a: 7 ms
        against 17 ms for the dense GEMM on 2 cores)."""
        if self.csr is None:
            return self.A.T @ (self.A * w[:, None])
        csr = self.csr
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            scaled = torch.sparse_csr_tensor(
                csr.crow_indices(),
                csr.col_indices(),
                csr.values() * w[self._entry_rows()],
                csr.shape,
                check_invariants=False,  # the structure of a valid CSR tensor
            )
            return (self.csr_t @ scaled).to_dense()

    def rows(self, idx: Tensor) -> Tensor:
        """The dense rows ``A[idx]`` (``(len(idx), d)``)."""
        if self.A is not None:
            return self.A.index_select(0, idx)
        crow, col, val = self.csr.crow_indices(), self.csr.col_indices(), self.csr.values()
        idx = idx.to(crow.device)
        start, count = crow[idx], crow[idx + 1] - crow[idx]
        owner = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device), count)
        # position of each gathered entry in the CSR arrays: its row's start + its rank in the row
        first = torch.cumsum(count, 0) - count
        pos = start[owner] + torch.arange(owner.numel(), device=idx.device) - first[owner]
        out = val.new_zeros(idx.numel(), self.csr.shape[1])
        return out.index_put_((owner, col[pos]), val[pos], accumulate=True)

    def max_row_norm(self) -> Tensor:
        """``max_j ‖a_j‖`` (0-d)."""
        if self.A is not None:
            return self.A.norm(dim=1).amax()
        val = self.csr.values()
        sq = val.new_zeros(self.csr.shape[0]).index_add_(0, self._entry_rows(), val * val)
        return sq.sqrt().amax()


def glm_node_terms(
    shard: GLMShard, b: Tensor, x: Tensor, loss: GLMLoss
) -> tuple[Tensor, Tensor, Tensor]:
    """What the nodes compute at ``x``, summed over their rows: ``(Σ φ, Σ φ' a, h)`` with
    ``h = φ''(Ax, b)`` per row. One product ``Ax`` and one ``Aᵀφ'`` for all local nodes."""
    t = shard.mv(x)
    return loss.value(t, b).sum(), shard.rmm(loss.d1(t, b)), loss.d2(t, b)


def glm_newton(
    features: Tensor,
    targets: Tensor,
    *,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "logistic",
    lam: float = 1e-3,
    iterations: int = 25,
    x0: Tensor | None = None,
) -> tuple[Tensor, list[float]]:
    """Exact Newton on ``P`` in float64: ``x ← x − ∇²P(x)⁻¹ ∇P(x)``; returns ``(x, [P(x^k)])``
    (``P(x^k)`` for ``k = 0..iterations``). The optimum (20+ Newton iterations) and the
    baseline of the benchmarks."""
    A, b = features.double(), targets.double()
    shard, phi = GLMShard(A), glm_loss(loss)
    x = torch.zeros(A.shape[1], dtype=A.dtype, device=A.device) if x0 is None else x0.to(A).clone()
    values = []
    for _ in range(iterations + 1):
        t = shard.mv(x)
        values.append(float(phi.value(t, b).mean() + lam / 2 * x.dot(x)))
        if len(values) > iterations:
            break
        g = shard.rmm(phi.d1(t, b)) / len(b) + lam * x
        x = x - newton_direction(shifted(shard.weighted_gram(phi.d2(t, b)) / len(b), lam), g)
    return x, values


def data_error(shard: GLMShard, targets: Tensor, loss: str | Callable) -> str | None:
    """Why the data cannot be used with ``loss`` (``None``: it can). Non-finite entries would
    make every step a skipped one; the logistic loss ``log(1 + e^{−bt})`` is defined for
    ``b = ±1``: a row labelled 0 adds ``log 2`` whatever ``x`` (it would be silently ignored) and
    other values rescale the margin."""
    values = shard.A if shard.A is not None else shard.csr.values()
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        return f"features must be finite; {bad} entries are NaN or ±inf"
    bad = int((~torch.isfinite(targets)).sum()) if targets.is_floating_point() else 0
    if bad:
        return f"targets must be finite; {bad} of them are NaN or ±inf"
    if loss != "logistic" or bool(((targets == 1) | (targets == -1)).all()):
        return None
    seen = torch.unique(targets).tolist()
    shown = ", ".join(f"{v:g}" for v in seen[:6]) + (", ..." if len(seen) > 6 else "")
    why = (
        "loss='logistic' needs targets in {-1, +1} (a row labelled 0 would add log 2 whatever x, "
        f"i.e. be ignored); got {len(seen)} distinct values {{{shown}}}: "
    )
    if set(seen) <= {0, 1}:
        return why + "map {0, 1} labels with 2*y - 1"
    if len(seen) == 2:
        return why + "map them with torch.where(y == y.max(), 1.0, -1.0)"
    return why + (
        "the logistic loss is binary; for class c against the rest use "
        "torch.where(y == c, 1.0, -1.0)"
    )


class GLMFit(NamedTuple):
    """The result of :func:`glm_fit`: the minimiser and, per iteration, ``P(x^k)``, the gap
    estimate, whether the Hessian was (re)factored, and the cumulative seconds."""

    x: Tensor
    history: list[dict[str, float]]


def glm_fit(
    features: Tensor,
    targets: Tensor,
    *,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "logistic",
    lam: float = 1e-3,
    tol: float = 1e-10,
    max_iter: int = 100,
    refresh: float = 0.7,
) -> GLMFit:
    """Minimise ``P`` on one machine: Newton steps with a reused Hessian factor.

    ``x ← x − (H_k + λI)⁻¹∇P(x)`` with ``H_k`` the Hessian at the last point where it was
    refactored: at ``x⁰``, and whenever the gap estimate ``½∇Pᵀ(H_k + λI)⁻¹∇P`` fell by less
    than the factor ``refresh`` (default 0.7: measured on a9a and w8a against 0.1-0.5) since the
    previous iteration (then ``H`` is recomputed at the current point first). Near ``x*`` a
    factor from a nearby point contracts the error by ``‖I − (H_k + λI)⁻¹∇²P‖`` per step, so
    most iterations cost two sparse products and a triangular solve instead of a Hessian (the
    idea NewtonLearn builds on: the Hessian at the optimum is learned once and reused). Stops
    when the gap estimate is at most ``tol`` (after taking that step) or after ``max_iter``
    iterations (``RuntimeWarning``). Features: dense, CSR or COO — pass sparse data as CSR
    (``load_libsvm(..., sparse=True)``): a dense matrix is converted on every call; labels as
    :func:`data_error` checks them (logistic: ±1). Float64.

    Example:
        >>> import torch
        >>> from torch_rankone.glm import glm_fit, glm_newton
        >>> gen = torch.Generator().manual_seed(0)
        >>> A = torch.randn(500, 8, generator=gen, dtype=torch.float64)
        >>> b = torch.where(A[:, 0] + 0.5 * torch.randn(500, generator=gen) > 0, 1.0, -1.0)
        >>> fit = glm_fit(A, b.double(), lam=1e-3, tol=1e-12)
        >>> p_star = glm_newton(A, b.double(), lam=1e-3, iterations=30)[1][-1]
        >>> abs(fit.history[-1]["loss"] - p_star) < 1e-9
        True
    """
    from .linalg import solve_with_factor

    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not 0 < refresh < 1:
        raise ValueError(f"refresh must be in (0, 1), got {refresh!r}")
    start = time.perf_counter()
    features = features.to(torch.float64)
    shard, phi, b = GLMShard(features), glm_loss(loss), targets.to(torch.float64)
    refusal = data_error(shard, b, loss)
    if refusal is not None:
        raise ValueError(refusal)
    n = shard.num_rows
    x = torch.zeros(features.shape[1], dtype=torch.float64, device=b.device)
    history: list[dict[str, float]] = []
    factor, last = None, math.inf
    for _ in range(max_iter):
        t = shard.mv(x)
        value = float(phi.value(t, b).mean() + lam / 2 * x.dot(x))
        g = shard.rmm(phi.d1(t, b)) / n + lam * x
        refactor = factor is None
        if not refactor:
            y = solve_with_factor(factor, g)
            gap = 0.5 * float(g.dot(y))
            refactor = not gap <= refresh * last  # slow (or NaN): a fresh Hessian
        if refactor:
            H = shard.weighted_gram(phi.d2(t, b)) / n
            factor = torch.linalg.cholesky(shifted(H, lam))
            y = solve_with_factor(factor, g)
            gap = 0.5 * float(g.dot(y))
        x = x - y
        last = gap
        history.append(
            {
                "loss": value,
                "gap_estimate": gap,
                "refactored": float(refactor),
                "time": time.perf_counter() - start,
            }
        )
        if gap <= tol:
            return GLMFit(x, history)
    warnings.warn(
        f"glm_fit: max_iter={max_iter} iterations ended with the gap estimate {last:.3g} > "
        f"tol={tol:g}; raise max_iter",
        RuntimeWarning,
        stacklevel=2,
    )
    return GLMFit(x, history)
