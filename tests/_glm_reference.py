"""Dense float64 references of the logistic GLM that NewtonLearn's tests share: random data,
``P``, ``∇P`` and ``h`` from their closed forms, and weighted Gram matrices."""

from __future__ import annotations

import torch
from torch.nn.functional import softplus


def problem(seed: int = 0, *, rows: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows × d`` standard normal features and ±1 labels (fair coins), float64."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    b = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0).double()
    return A, b


def dense(A, b, x, lam: float):
    """``P(x)``, ``∇P(x)`` and ``h(x) = σ(bt)σ(−bt)`` of ``P = mean softplus(−b aᵀx) + λ‖x‖²/2``."""
    t = A @ x
    P = softplus(-b * t).mean() + lam / 2 * x.dot(x)
    g = A.T @ (-b * torch.sigmoid(-b * t)) / len(b) + lam * x
    return P, g, torch.sigmoid(b * t) * torch.sigmoid(-b * t)


def gram(A, w):
    """``(1/N) Σ_r w_r a_r a_rᵀ``."""
    return (A.T * w) @ A / A.shape[0]


def bfgs_direct_update(B, s, y):
    """The BFGS update of the Hessian approximation itself (not its inverse):
    ``B − (Bs)(Bs)ᵀ/(sᵀBs) + yyᵀ/(yᵀs)``, the reference for the package's inverse update."""
    Bs = B @ s
    return B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)
