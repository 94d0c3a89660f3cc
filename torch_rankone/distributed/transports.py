"""NewtonLearn's parameter-server protocol (Islamov et al. 2021, Algorithms 1–2), two transports.

Nodes hold data shards; each iteration they send the server their gradient sums, the learning
messages with the rows ``a_ij`` they concern, and β; the server solves and broadcasts ``x``.
:class:`SimulatedTransport` runs all nodes in one process (every collective is the identity);
:class:`CollectiveTransport` maps the messages onto ``torch.distributed`` collectives (gloo on
CPU, NCCL on GPU): sums and maxima by ``reduce``/``all_reduce``, the variable number of
``(coefficient, a_ij)`` pairs by a padded ``gather`` to the server, ``x`` by ``broadcast``.

Each rank holds ``L`` consecutive nodes (ranks in group order), so the server receives every
node's rows in global node order, the order of the simulated run. A failed collective — a peer
that died, or the process group's timeout — is re-raised as a :class:`ProtocolError` naming the
step of the protocol and this rank, so every process ends with a clear error instead of hanging.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ProtocolError", "SimulatedTransport", "CollectiveTransport"]


class ProtocolError(RuntimeError):
    """A collective of the NewtonLearn protocol failed, or the ranks disagree on the setup."""


class SimulatedTransport:
    """All nodes in this process: this process is the server and every message is local."""

    rank = 0
    world_size = 1
    is_server = True

    def check_agreement(self, meta: dict[str, int]) -> None:
        """Nothing to compare in one process."""

    def sum_to_server(self, t: Tensor) -> Tensor:
        return t

    def max_everywhere(self, t: Tensor) -> Tensor:
        return t

    def gather_to_server(self, rows: Tensor) -> Tensor:
        return rows

    def broadcast_from_server(self, t: Tensor) -> Tensor:
        return t

    def broadcast_generator(self, generator: torch.Generator) -> None:
        """One generator in one process: nothing to align."""


class CollectiveTransport:
    """``torch.distributed`` collectives on ``group`` (``None``: the default group), with the
    server at group rank ``server_rank``."""

    def __init__(self, group: Any = None, server_rank: int = 0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ProtocolError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (or pass num_nodes=n without a "
                "process_group for simulated nodes)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if not isinstance(server_rank, int) or not 0 <= server_rank < self.world_size:
            raise ValueError(
                f"server_rank must be a rank of the group (0..{self.world_size - 1}), "
                f"got {server_rank!r}"
            )
        self.server_rank = server_rank
        self._server = server_rank if group is None else dist.get_global_rank(group, server_rank)
        self.is_server = self.rank == server_rank
        self.device = torch.device("cuda" if dist.get_backend(group) == "nccl" else "cpu")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _run(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, group=self.group, **kwargs)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise ProtocolError(
                f"NewtonLearn: the collective '{what}' failed on rank {self.rank} of "
                f"{self.world_size} (a peer process died, or the process group's timeout "
                f"passed): {exc}"
            ) from exc

    def _to_comm(self, t: Tensor) -> Tensor:
        return t.to(self.device).contiguous()

    def check_agreement(self, meta: dict[str, int]) -> None:
        """All-gather ``meta`` and raise on every rank when the ranks disagree (e.g. a shard
        with another number of features): one small collective before any large one."""
        mine = torch.tensor(list(meta.values()), dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._run("all_gather(metadata)", dist.all_gather, every, mine)
        table = torch.stack(every).cpu()
        bad = [k for j, k in enumerate(meta) if (table[:, j] != table[0, j]).any()]
        if bad:
            per_rank = {k: table[:, list(meta).index(k)].tolist() for k in bad}
            raise ProtocolError(
                f"NewtonLearn: the ranks disagree on {', '.join(bad)} (values by rank: "
                f"{per_rank}); every rank must pass shards with the same number of nodes, rows "
                "per node and features, and the same dtype, variant and option"
            )

    def sum_to_server(self, t: Tensor) -> Tensor:
        buf = self._to_comm(t)
        self._run("reduce(sum)", dist.reduce, buf, dst=self._server, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def max_everywhere(self, t: Tensor) -> Tensor:
        buf = self._to_comm(t)
        self._run("all_reduce(max)", dist.all_reduce, buf, op=dist.ReduceOp.MAX)
        return buf.to(t.device)

    def gather_to_server(self, rows: Tensor) -> Tensor:
        """Every rank's ``rows`` (the same shape on all ranks: callers pad with zero rows),
        concatenated in rank order on the server; an empty tensor elsewhere."""
        buf = self._to_comm(rows)
        out = [torch.empty_like(buf) for _ in range(self.world_size)] if self.is_server else None
        self._run("gather(messages)", dist.gather, buf, gather_list=out, dst=self._server)
        if not self.is_server:
            return rows[:0]
        return torch.cat(out).to(rows.device)

    def broadcast_from_server(self, t: Tensor) -> Tensor:
        buf = self._to_comm(t)
        self._run("broadcast(x)", dist.broadcast, buf, src=self._server)
        return buf.to(t.device)

    def broadcast_generator(self, generator: torch.Generator) -> None:
        """The server's generator state to every rank: the compressors' randomness is drawn
        for all nodes on every rank, so the generators must start equal."""
        state = generator.get_state()
        buf = self._to_comm(state)
        self._run("broadcast(generator)", dist.broadcast, buf, src=self._server)
        generator.set_state(buf.cpu())
