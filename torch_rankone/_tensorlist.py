"""Vectors stored as lists of parameter-shaped tensors.

Every solver in the package works on the concatenation ``x`` of all parameters without ever
building it: a "vector" is a list of tensors shaped like the parameters. These helpers are the
few reductions and constructors that need more than one ``torch._foreach_*`` call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TensorList = list[Tensor]


def as_tensor_list(v: Tensor | Sequence[Tensor]) -> tuple[TensorList, bool]:
    """Return ``(list_of_tensors, was_single_tensor)`` so callers can accept either form."""
    if isinstance(v, Tensor):
        return [v], True
    return list(v), False


def numel(xs: Sequence[Tensor]) -> int:
    """Total number of elements ``N``."""
    return sum(x.numel() for x in xs)


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor], *, dtype: torch.dtype | None = None) -> Tensor:
    """``<x, y>`` over all tensors, as a 0-d tensor (accumulated in ``dtype`` if given).

    The products are formed in the inputs' dtype (no converted copies: this is on optimizers'
    paths); where float32 products could underflow, pass float64 vectors.
    No host synchronisation: the result stays on the tensors' device.
    """
    if len(xs) != len(ys):
        raise ValueError(f"dot: vectors have {len(xs)} and {len(ys)} tensors")
    if not xs:
        return torch.zeros((), dtype=dtype or torch.get_default_dtype())
    parts = [(x * y).sum(dtype=dtype) for x, y in zip(xs, ys)]
    return torch.stack(parts).sum()


def norm(xs: Sequence[Tensor]) -> Tensor:
    """Euclidean norm over all tensors, as a 0-d tensor."""
    if not xs:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(xs))))


def gram(vectors: Sequence[Sequence[Tensor]], *, dtype: torch.dtype | None = None) -> Tensor:
    """The ``k x k`` matrix of inner products ``<u_i, u_j>`` (symmetric, upper half computed)."""
    k = len(vectors)
    rows = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            rows[i][j] = rows[j][i] = dot(vectors[i], vectors[j], dtype=dtype)
    return torch.stack([torch.stack(r) for r in rows]) if k else torch.zeros(0, 0, dtype=dtype)


def combine(coefs: Tensor, vectors: Sequence[Sequence[Tensor]]) -> TensorList:
    """``sum_j coefs[j] * vectors[j]``; ``coefs`` is a 1-D tensor (no host sync)."""
    out = [torch.zeros_like(t) for t in vectors[0]]
    for j, vec in enumerate(vectors):
        torch._foreach_add_(out, torch._foreach_mul(list(vec), coefs[j].to(vec[0].dtype)))
    return out


def randn_like(like: Sequence[Tensor], generator: torch.Generator | None = None) -> TensorList:
    """Gaussian vector shaped like ``like``, drawn in parameter order on the generator's device.

    Drawing on the generator's device and then moving makes the draw reproducible across
    devices (``torch.randn(p.shape, generator=g, dtype=p.dtype)`` then ``.to(p)``).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return [
        torch.randn(p.shape, generator=generator, dtype=p.dtype, device=device).to(p.device)
        for p in like
    ]


def rademacher_like(like: Sequence[Tensor], generator: torch.Generator | None = None) -> TensorList:
    """Random signs ``±1`` shaped like ``like`` (drawn like :func:`randn_like`): ``E[u uᵀ] = I``,
    the lowest-variance Hutchinson probe of a diagonal."""
    device = generator.device if generator is not None else torch.device("cpu")
    return [
        torch.randint(0, 2, p.shape, generator=generator, device=device, dtype=p.dtype)
        .mul_(2)
        .sub_(1)
        .to(p.device)
        for p in like
    ]


def flatten(xs: Sequence[Tensor]) -> Tensor:
    """Concatenate into one 1-D tensor (for dense references and small problems only)."""
    return torch.cat([x.reshape(-1) for x in xs]) if xs else torch.zeros(0)


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> TensorList:
    """Split a 1-D tensor into tensors shaped like ``like`` (inverse of :func:`flatten`)."""
    if vec.numel() != numel(like):
        raise ValueError(f"unflatten: got {vec.numel()} numbers for {numel(like)} elements")
    out, offset = [], 0
    for p in like:
        out.append(vec[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def check_like(name: str, xs: Sequence[Tensor], like: Sequence[Tensor]) -> None:
    """Raise a clear ``ValueError`` unless ``xs`` has the shapes of ``like``."""
    if len(xs) != len(like):
        raise ValueError(f"{name} has {len(xs)} tensors, expected {len(like)} (one per parameter)")
    for i, (x, p) in enumerate(zip(xs, like)):
        if x.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)}, expected {tuple(p.shape)}")
