"""The one place kernels are dispatched from: compiled ``torch_rankone._C`` ops or references.

Every kernel of SPEC §5 has a pure-PyTorch reference here with the same semantics. Callers
(``linalg``, the optimizers, NewtonLearn) use only the functions of this module, so the compiled
extension, when it lands, replaces the references in one place.

Low-rank solve (SPEC §3, §5.1). For ``k`` vectors ``U = [u_1..u_k]`` (each a list of
parameter-shaped tensors), a symmetric ``k×k`` matrix ``C`` and a scalar ``c``,

    y = (c·I + U C Uᵀ)⁻¹ g = (g − U a) / c,   a = (c·I_k + C G)⁻¹ C b,
    G = UᵀU,  b = Uᵀg.

This is Woodbury's identity with ``(C⁻¹ + G/c)⁻¹ = c (c·I + C G)⁻¹ C``, which needs no inverse of
``C``; by Sylvester's determinant identity ``c·I_k + C G`` is singular exactly when the ``N×N``
operator is. The ``k×k`` algebra is done in float64 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._tensorlist import TensorList, combine, dot, gram

__all__ = [
    "has_extension",
    "lowrank_gram",
    "lowrank_coefficients",
    "lowrank_solve",
    "lowrank_solve_update",
]


def has_extension() -> bool:
    """Whether the compiled ``torch_rankone._C`` kernels are in use (else the references)."""
    return False


def lowrank_gram(
    g: Sequence[Tensor], U: Sequence[Sequence[Tensor]]
) -> tuple[Tensor, Tensor]:
    """``(G, b) = (UᵀU, Uᵀg)`` accumulated in float64 (pass 1 of the fused kernel)."""
    G = gram(U, dtype=torch.float64)
    b = torch.stack([dot(u, g, dtype=torch.float64) for u in U])
    return G, b


def lowrank_coefficients(G: Tensor, b: Tensor, C: Tensor, c: float | Tensor) -> Tensor:
    """``a = (c·I + C G)⁻¹ C b`` in float64 (the ``k×k`` step between the two passes)."""
    C64 = C.to(device=G.device, dtype=torch.float64)
    c64 = torch.as_tensor(c, dtype=torch.float64, device=G.device)
    eye = torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
    return torch.linalg.solve(c64 * eye + C64 @ G, C64 @ b)


def _apply(g: Sequence[Tensor], U: Sequence[Sequence[Tensor]], a: Tensor, c) -> TensorList:
    """``y = (g − U a) / c`` (pass 2)."""
    y = torch._foreach_sub(list(g), combine(a, U))
    # dtype given directly: as_tensor(0.7) would round through float32 first
    return torch._foreach_div(y, torch.as_tensor(c, dtype=g[0].dtype, device=g[0].device))


def lowrank_solve(
    g: Sequence[Tensor], U: Sequence[Sequence[Tensor]], C: Tensor, c: float | Tensor
) -> TensorList:
    """``y = (c·I + U C Uᵀ)⁻¹ g`` without checks or host synchronisation."""
    G, b = lowrank_gram(g, U)
    return _apply(g, U, lowrank_coefficients(G, b, C, c), c)


def lowrank_solve_update(
    params: Sequence[Tensor],
    g: Sequence[Tensor],
    U: Sequence[Sequence[Tensor]],
    C: Tensor,
    c: float | Tensor,
    lr: float | Tensor,
) -> None:
    """In place: ``p ← p − lr · (c·I + U C Uᵀ)⁻¹ g``."""
    y = lowrank_solve(g, U, C, c)
    lr = torch.as_tensor(lr, device=params[0].device, dtype=params[0].dtype)
    torch._foreach_sub_(list(params), torch._foreach_mul(y, lr))
