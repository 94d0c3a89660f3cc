"""Where the optimizers' vectors live across processes, and the few collectives they need.

Three layouts, decided at the first step from the parameters and ``torch.distributed``:

* ``"single"``: one process (or a singleton group): no collectives.
* ``"replicas"``: every rank holds all parameters and its own part of the batch (plain models,
  or DDP). Values that did not pass through the model's own gradient averaging are averaged
  here, in buckets (never one flat copy of every gradient): the gradient and HVPs of a loss
  closure, exact HVPs of graph gradients; with ``grads_synced`` (DDP) the gradient and the
  finite-difference HVPs of a backward closure are DDP's already and only the loss is reduced.
* ``"shards"``: the parameters are ``DTensor`` shards (FSDP2 ``fully_shard`` on a 1-D mesh). FSDP2
  reduce-scatters every gradient, so each rank already holds its piece of the union-batch
  gradient; vectors stay local and only scalars and ``k×k`` matrices are reduced
  (:func:`torch_rankone._tensorlist.sharded_over`).

At the first distributed step the ranks compare a signature of their parameter lists (count,
global shapes, dtypes, order): a mismatch raises :class:`ReplicaMismatchError` on every rank,
instead of replicas that drift apart silently or a collective that aborts the process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._tensorlist import TensorList, flatten, unflatten

#: elements per all-reduce when averaging vectors (a bucket is one temporary copy)
BUCKET_NUMEL = 1 << 22


class ReplicaMismatchError(RuntimeError):
    """The ranks of a process group hold different parameter lists."""


class Layout(NamedTuple):
    kind: str  # "single" | "replicas" | "shards"
    group: Any  # the process group of the collectives (None: the default group)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def layout_of(params: Sequence[Tensor], process_group: Any) -> Layout:
    """The layout of ``params`` (see the module docstring)."""
    sharded = [p for p in params if is_sharded(p)]
    if sharded:
        if len(sharded) != len(params):
            raise ValueError(
                "some parameters are DTensors (FSDP2) and some are not: shard the whole model "
                "with fully_shard, or optimise the two kinds with separate optimizers"
            )
        mesh = sharded[0].device_mesh  # fully_shard makes one mesh object per call: compare
        if mesh.ndim != 1 or any(p.device_mesh != mesh for p in sharded):
            raise NotImplementedError(
                "sharded parameters are supported on one 1-D device mesh (FSDP2 fully_shard); "
                "HSDP and tensor parallelism are not"
            )
        group = mesh.get_group()
        if process_group is not None and process_group is not group:
            raise ValueError(
                "process_group must be None (or the mesh's group) for FSDP2-sharded parameters: "
                "the shards' mesh decides which ranks take part"
            )
        return Layout("shards", group)
    if not (process_group is not None or (dist.is_available() and dist.is_initialized())):
        return Layout("single", None)
    if dist.get_world_size(process_group) == 1:
        return Layout("single", process_group)
    return Layout("replicas", process_group)


def collective_device(group: Any, like: Tensor) -> torch.device:
    """Where a tensor for a collective must live: NCCL takes the parameters' CUDA device (not
    the current device, which a rank may never have set), gloo the CPU or CUDA alike."""
    backend = dist.get_backend(group)
    return like.device if "nccl" in str(backend).lower() else torch.device("cpu")


def _signature(params: Sequence[Tensor]) -> tuple[int, int, int]:
    """``(count, total elements, hash of (global shape, dtype) in order)``."""
    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    return len(params), sum(p.numel() for p in params), digest


def check_same_params(params: Sequence[Tensor], layout: Layout, owner: str) -> None:
    """Raise :class:`ReplicaMismatchError` on every rank unless all ranks of the layout's group
    hold parameter lists with the same count, global shapes, dtypes and order (one all-gather
    of three integers; shapes of any size give the same message size, so it cannot abort)."""
    if layout.kind == "single":
        return
    group = layout.group
    device = collective_device(group, params[0])
    mine = torch.tensor(_signature(params), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(t.tolist()) for t in every]
    if len(set(rows)) > 1:
        ranks = dist.get_process_group_ranks(group) if group is not None else range(len(rows))
        what = ", ".join(
            f"rank {r}: {count} tensors, {total} elements"
            for r, (count, total, _) in zip(ranks, rows)
        )
        raise ReplicaMismatchError(
            f"{owner}: the ranks hold different parameter lists ({what}; or the same counts with "
            "other shapes, dtypes or order). Every rank must build the same model and pass its "
            "parameters in the same order."
        )


def average(tensors: TensorList, group: Any, *, inplace: bool = False) -> TensorList:
    """Mean over the ranks of ``group``, all-reduced in buckets of ``BUCKET_NUMEL`` elements.

    ``inplace``: the results are written back into ``tensors`` (which the caller owns);
    otherwise new tensors are returned and the inputs (which may belong to an autograd graph)
    are left alone.
    """
    world = dist.get_world_size(group)
    out: TensorList = []
    bucket: TensorList = []

    def flush() -> None:
        if not bucket:
            return
        flat = flatten(bucket)
        dist.all_reduce(flat, group=group)
        flat /= world
        pieces = unflatten(flat, bucket)
        if inplace:
            torch._foreach_copy_(bucket, pieces)
            out.extend(bucket)
        else:
            out.extend(pieces)
        bucket.clear()

    size = 0
    for t in tensors:
        if bucket and (size + t.numel() > BUCKET_NUMEL or t.dtype != bucket[0].dtype):
            flush()
            size = 0
        bucket.append(t)
        size += t.numel()
    flush()
    return out


def mean_scalar(value: Tensor, group: Any) -> Tensor:
    """The mean over the ranks of a 0-d tensor (one all-reduce of one number)."""
    buf = value.detach().reshape(1).clone()
    dist.all_reduce(buf, group=group)
    return (buf / dist.get_world_size(group)).reshape(()).to(value.dtype)
