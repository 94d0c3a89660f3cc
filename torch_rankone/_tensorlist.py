"""Vectors stored as lists of parameter-shaped tensors.

Every solver in the package works on the concatenation ``x`` of all parameters without ever
building it: a "vector" is a list of tensors shaped like the parameters. These helpers are the
few reductions and constructors that need more than one ``torch._foreach_*`` call.

Sharded vectors (FSDP2): inside :func:`sharded_over`, each rank holds its own piece of every
tensor (the local shard of a ``DTensor`` parameter), element-wise operations stay local, and the
reductions here (:func:`dot`, :func:`norm`, :func:`gram`) sum their partial results over the
process group — one all-reduce of a scalar or a ``k×k`` matrix each, never of a vector.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

TensorList = list[Tensor]

# The process group whose ranks hold the pieces of sharded vectors (None: whole vectors).
_SHARD_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("shard_group", default=None)
_NO_GROUP = object()


@contextlib.contextmanager
def sharded_over(group: Any) -> Iterator[None]:
    """Within this block, vectors are sharded over ``group`` (a process group; ``None`` means
    the default group): :func:`dot`, :func:`norm` and :func:`gram` all-reduce their partial
    sums over it."""
    token = _SHARD_GROUP.set(_NO_GROUP if group is None else group)
    try:
        yield
    finally:
        _SHARD_GROUP.reset(token)


def sum_over_shards(partial: Tensor) -> Tensor:
    """A partial sum completed over the shard group (the identity for whole vectors)."""
    group = _SHARD_GROUP.get()
    if group is None:
        return partial
    partial = partial.contiguous()
    dist.all_reduce(partial, group=None if group is _NO_GROUP else group)
    return partial


def local(t: Tensor) -> Tensor:
    """The piece of ``t`` this rank holds: a ``DTensor``'s local shard, else ``t`` itself.

    The local shard shares storage with the ``DTensor``: in-place changes reach the parameter.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def locals_(ts: Sequence[Tensor]) -> TensorList:
    """:func:`local` of every tensor."""
    return [local(t) for t in ts]


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
    return sum_over_shards(_local_dot(xs, ys, dtype))


def _local_dot(xs: Sequence[Tensor], ys: Sequence[Tensor], dtype: torch.dtype | None) -> Tensor:
    return torch.stack([(x * y).sum(dtype=dtype) for x, y in zip(xs, ys)]).sum()


def norm(xs: Sequence[Tensor]) -> Tensor:
    """Euclidean norm over all tensors, as a 0-d tensor."""
    if not xs:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(list(xs)))
    if _SHARD_GROUP.get() is None:
        return torch.linalg.vector_norm(norms)
    return sum_over_shards(norms.square().sum()).sqrt()


def norm1(xs: Sequence[Tensor]) -> Tensor:
    """``Σ|x_i|`` over all tensors, as a 0-d tensor."""
    return sum_over_shards(torch.stack(torch._foreach_norm(list(xs), 1)).sum())


def gram(vectors: Sequence[Sequence[Tensor]], *, dtype: torch.dtype | None = None) -> Tensor:
    """The ``k x k`` matrix of inner products ``<u_i, u_j>`` (symmetric, upper half computed;
    sharded: one all-reduce of the matrix)."""
    k = len(vectors)
    rows = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            rows[i][j] = rows[j][i] = _local_dot(vectors[i], vectors[j], dtype)
    if not k:
        return torch.zeros(0, 0, dtype=dtype)
    return sum_over_shards(torch.stack([torch.stack(r) for r in rows]))


def combine(coefs: Tensor, vectors: Sequence[Sequence[Tensor]]) -> TensorList:
    """``sum_j coefs[j] * vectors[j]``; ``coefs`` is a 1-D tensor (no host sync)."""
    out = [torch.zeros_like(t) for t in vectors[0]]
    for j, vec in enumerate(vectors):
        torch._foreach_add_(out, torch._foreach_mul(list(vec), coefs[j].to(vec[0].dtype)))
    return out


def _shard_slices(like: Tensor) -> tuple[slice, ...]:
    """Where this rank's shard of the ``DTensor`` ``like`` sits in the global tensor."""
    # the helper DTensor itself uses to place shards (no public equivalent in this torch)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        like.shape, like.device_mesh, like.placements
    )
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def shard_of(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (shaped like the global ``like``) as ``like`` holds it: on ``like``'s device,
    and cut to this rank's shard when ``like`` is a ``DTensor`` (a view, no communication)."""
    # non_blocking: a fresh host tensor, so the copy need not wait for the device
    if hasattr(like, "device_mesh"):
        return full[_shard_slices(like)].to(local(like).device, non_blocking=True)
    return full.to(like.device, non_blocking=True)


def embed_shard(piece: Tensor, like: Tensor) -> Tensor:
    """The global tensor that is ``piece`` on this rank's shard of ``like`` and zero elsewhere
    (``piece`` itself for an ordinary tensor): summing it over the ranks gives the whole."""
    if not hasattr(like, "device_mesh"):
        return piece
    full = piece.new_zeros(like.shape)
    full[_shard_slices(like)] = piece
    return full


def randn_like(like: Sequence[Tensor], generator: torch.Generator | None = None) -> TensorList:
    """Gaussian vector shaped like ``like``, drawn in parameter order on the generator's device.

    Drawing on the generator's device and then moving makes the draw reproducible across
    devices (``torch.randn(p.shape, generator=g, dtype=p.dtype)`` then ``.to(p)``). For a
    ``DTensor`` in ``like`` the global tensor is drawn and this rank keeps its shard, so the
    sharded vector equals the one-process draw (each rank draws every number once).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return [
        shard_of(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=device), p)
        for p in like
    ]


def rademacher_like(like: Sequence[Tensor], generator: torch.Generator | None = None) -> TensorList:
    """Random signs ``±1`` shaped like ``like`` (drawn like :func:`randn_like`): ``E[u uᵀ] = I``,
    the lowest-variance Hutchinson probe of a diagonal."""
    device = generator.device if generator is not None else torch.device("cpu")
    return [
        shard_of(
            torch.randint(0, 2, p.shape, generator=generator, device=device, dtype=p.dtype)
            .mul_(2)
            .sub_(1),
            p,
        )
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
