"""One rank of the NewtonLearn ``torch.distributed`` tests (run by test_newton_learn_distributed).

``python _newton_learn_worker.py RANK WORLD STORE_FILE OUT SCENARIO`` joins a gloo group through
a FileStore, runs the scenario and saves ``{"ok": True, "result": ...}`` or
``{"ok": False, "error": traceback, "type": name, "seconds": ...}`` to ``OUT``. The problem is
shared with the parent (:func:`make_problem`), which runs the simulated reference on the union.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from torch_rankone import NewtonLearn

LOCAL_NODES, M, D, STEPS = 2, 20, 5, 12
TIMEOUT_S = 20.0  # the process group's timeout: a collective never waits longer


def make_problem(world: int):
    """``world·LOCAL_NODES`` nodes of ``M`` rows; rank ``r`` holds nodes ``[r·L, (r+1)·L)``."""
    gen = torch.Generator().manual_seed(0)
    rows = world * LOCAL_NODES * M
    A = torch.randn(rows, D, generator=gen, dtype=torch.float64)
    A[:, -1] = 1.0  # an intercept column
    b = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0).double()
    return A, b


def shard(A, b, rank):
    rows = slice(rank * LOCAL_NODES * M, (rank + 1) * LOCAL_NODES * M)
    return A[rows], b[rows]


RUNS = {  # name: (NewtonLearn keyword arguments, start value)
    "nl1": (dict(variant="nl1"), 0.0),
    "nl2": (dict(variant="nl2", server_rank=2), 0.3),
    "cnl": (dict(variant="cnl", server_rank=1), 2.0),
}


def run(A, b, kw, start, **mode):
    """STEPS iterations; ``(iterates, P values, cumulative bits)``."""
    x = torch.full((D,), start, dtype=torch.float64, requires_grad=True)
    opt = NewtonLearn([x], A, b, **kw, **mode)
    traj, losses = [], []
    for _ in range(STEPS):
        losses.append(opt.step())
        traj.append(x.detach().clone())
    return torch.stack(traj), torch.stack(losses), [h["bits"] for h in opt.history]


def scenario_same_iterates(rank: int, world: int):
    """Every variant on this rank's shard. The global seeds differ per rank, so only the
    broadcast of the server's generator makes the compressors' draws agree."""
    torch.manual_seed(100 + rank)
    A, b = shard(*make_problem(world), rank)
    out = {}
    for name, (kw, start) in RUNS.items():
        out[name] = run(A, b, kw, start, num_nodes=LOCAL_NODES)
        server = kw.get("server_rank", 0)
        out[name + "_seed"] = 100 + server
    return out


def scenario_shape_mismatch(rank: int, world: int):
    """Rank 1 has 21 rows per node: every rank must refuse before any large collective."""
    A, b = shard(*make_problem(world), rank)
    if rank == 1:
        A, b = torch.cat([A, A[:2]]), torch.cat([b, b[:2]])
    x = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    NewtonLearn([x], A, b, num_nodes=LOCAL_NODES)
    return {}


def scenario_dead_rank(rank: int, world: int):
    """Rank 2 dies (no clean-up, like a crash) after 3 steps; the others are in a collective."""
    A, b = shard(*make_problem(world), rank)
    x = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    opt = NewtonLearn([x], A, b, num_nodes=LOCAL_NODES)
    for k in range(STEPS):
        if rank == 2 and k == 3:
            os._exit(3)
        opt.step()
    return {}


def main(argv: list[str]) -> int:
    rank, world, store_file, out, name = int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5]
    start = time.monotonic()
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    try:
        store = dist.FileStore(store_file, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        result = {"ok": True, "result": globals()["scenario_" + name](rank, world)}
    except BaseException as exc:
        result = {"ok": False, "error": traceback.format_exc(), "type": type(exc).__name__}
    result["seconds"] = time.monotonic() - start
    torch.save(result, out)
    # a dead peer makes destroy_process_group itself fail or wait: leave without it
    os._exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
