"""Worker and shared runs for ``tests/test_scaling.py``: FSDP2 (``fully_shard``), DDP without
double averaging, distributed checkpoints and checked replicas, on two gloo ranks.

Run as ``python _scaling_worker.py RANK WORLD STORE OUT SCENARIO...`` (see
:func:`_dist_harness.worker_main`). The ``run`` function also gives the parent its
single-process reference on the union batch: both sides differ only in how the model is wrapped
and where the rows live.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from _dist_harness import scenarios_in, worker_main
from torch import nn
from torch.nn import functional as F

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton
from torch_rankone.optim import ReplicaMismatchError
from torch_rankone.optim import _data_parallel as data_parallel

STEPS = 4
BATCH = 16  # the union batch; rank r holds rows [r·B/W, (r+1)·B/W)

#: name → optimizer factory (params, module) used by every scenario and by the references
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "rank_one": lambda ps, m: RankOneNewton(ps, rank=2, module=m),
    "rank_one_isotropic": lambda ps, m: RankOneNewton(ps, preconditioner="isotropic", module=m),
    "neumann": lambda ps, m: NeumannIHVP(ps, num_terms=4, scale_refresh=2, module=m),
    "fisher": lambda ps, m: FisherNewton(ps, module=m, momentum=0.5),
}


def data(rank: int | None = None, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 3, (BATCH,), generator=gen)
    if rank is None:
        return X, Y
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return X[rows], Y[rows]


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def fsdp(m: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(m)


def flat(m: nn.Module) -> torch.Tensor:
    """All parameters, whole (a sharded parameter is gathered)."""
    parts = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in m.parameters()]
    return torch.cat([t.detach().reshape(-1) for t in parts]).clone()


def stepper(
    name: str, net: nn.Module, opt: torch.optim.Optimizer, X, Y
) -> Callable[[], torch.Tensor]:
    """One step through the convention the optimizer takes: per-sample losses for FisherNewton,
    a zero_grad/backward/return-loss closure for the others."""
    if name == "fisher":
        return lambda: opt.step(lambda: F.cross_entropy(net(X), Y, reduction="none"))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(X), Y)
        loss.backward()
        return loss

    return lambda: opt.step(closure)


def run(name: str, wrap: str = "none", rank: int | None = None, world: int = 1, **kw) -> dict:
    """STEPS steps of optimizer ``name`` on the model wrapped as ``wrap`` (``"none"``,
    ``"ddp"``, ``"fsdp"``) with this rank's rows (all rows when ``rank`` is None)."""
    base = model()
    net = {"none": lambda m: m, "ddp": nn.parallel.DistributedDataParallel, "fsdp": fsdp}[wrap](
        base
    )
    torch.manual_seed(0 if rank is None else rank)  # only the broadcast generator makes them agree
    opt = OPTIMIZERS[name](list(net.parameters()), net if wrap == "ddp" else base, **kw)
    step = stepper(name, net, opt, *data(rank, world))
    traj, losses = [], []
    for _ in range(STEPS):
        losses.append(step().detach())
        traj.append(flat(net))
    return {"trajectory": torch.stack(traj), "losses": torch.stack(losses), **opt.counters()}


# ------------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------------


def scenario_fsdp(rank: int, world: int) -> dict:
    return {name: run(name, "fsdp", rank, world) for name in OPTIMIZERS}


def scenario_ddp(rank: int, world: int) -> dict:
    return {name: run(name, "ddp", rank, world) for name in OPTIMIZERS}


_IN_DDP_HOOK = threading.local()


def scenario_collective_bytes(rank: int, world: int) -> dict:
    """Bytes sent per step by RankOneNewton's own collectives and by DDP's (through a comm hook
    that wraps the default all-reduce hook), with DDP's averaging trusted (the default for a
    DDP ``module``) and not (``grads_synced=False``)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    sent = {"optimizer": 0, "ddp": 0, "largest": 0}
    originals = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "broadcast")}

    def counting(name):
        def collective(tensor_or_list, *args, **kwargs):
            tensor = tensor_or_list if name != "all_gather" else args[0]
            who = "ddp" if getattr(_IN_DDP_HOOK, "on", False) else "optimizer"
            sent[who] += tensor.numel() * tensor.element_size()
            if who == "optimizer":
                sent["largest"] = max(sent["largest"], tensor.numel())
            return originals[name](tensor_or_list, *args, **kwargs)

        return collective

    def ddp_hook(state, bucket):
        _IN_DDP_HOOK.on = True
        try:
            return allreduce_hook(state, bucket)
        finally:
            _IN_DDP_HOOK.on = False

    out = {}
    data_parallel.BUCKET_NUMEL = 40  # small buckets: the averaging must split the gradient
    for synced in (None, False):
        net = nn.parallel.DistributedDataParallel(model())
        net.register_comm_hook(None, ddp_hook)
        opt = RankOneNewton(net.parameters(), module=net, grads_synced=synced)
        step = stepper("rank_one", net, opt, *data(rank, world))
        for n in originals:
            setattr(dist, n, counting(n))
        try:
            step()  # the first step also checks the replicas and broadcasts the generator
            sent.update(optimizer=0, ddp=0, largest=0)
            for _ in range(3):
                step()
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
        numel = sum(p.numel() for p in net.parameters())
        out["default" if synced is None else "not_synced"] = {
            "optimizer_bytes_per_step": sent["optimizer"] / 3,
            "ddp_bytes_per_step": sent["ddp"] / 3,
            "gradient_bytes": numel * 8,
            "largest_collective_numel": sent["largest"],
        }
    return out


def _dcp_run(name: str, rank: int, world: int, sharded: bool, folder: Path) -> dict:
    """2 steps, save model and optimizer with DCP, 2 more steps; then a fresh model and
    optimizer (another initialisation and seed) load the checkpoint and take the same 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def build(seed: int):
        net = model(seed)
        net = fsdp(net) if sharded else net
        torch.manual_seed(seed + rank)
        opt = OPTIMIZERS[name](list(net.parameters()), net)
        return net, opt, stepper(name, net, opt, *data(rank, world))

    net, opt, step = build(0)
    for _ in range(2):
        step()
    where = folder / f"dcp_{name}_{'fsdp' if sharded else 'plain'}"
    dcp.save(
        {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
        checkpoint_id=str(where),
    )
    for _ in range(2):
        step()
    uninterrupted = flat(net)

    net2, opt2, step2 = build(5)
    template = {"model": get_model_state_dict(net2), "optim": get_optimizer_state_dict(net2, opt2)}
    dcp.load(template, checkpoint_id=str(where))
    set_model_state_dict(net2, template["model"])
    set_optimizer_state_dict(net2, opt2, template["optim"])
    for _ in range(2):
        step2()
    return {"uninterrupted": uninterrupted, "resumed": flat(net2), **opt2.counters()}


def scenario_dcp(rank: int, world: int) -> dict:
    folder = Path(os.environ["DIST_TEST_FOLDER"])
    return {
        f"{name}-{kind}": _dcp_run(name, rank, world, kind == "fsdp", folder)
        for name in ("rank_one", "neumann", "fisher")
        for kind in ("plain", "fsdp")
    }


def scenario_fsdp_refusals(rank: int, world: int) -> dict:
    """Under FSDP2 a loss closure, graph gradients and ``hvp="exact"`` cannot work (autograd
    does not reach sharded parameters): each raises ``CurvatureError`` and changes nothing."""
    from torch_rankone.optim import CurvatureError

    net = fsdp(model())
    X, Y = data(rank, world)
    before = flat(net)
    messages = {}

    def graph_step(opt):
        opt.zero_grad()
        F.cross_entropy(net(X), Y).backward(create_graph=True)
        return opt.step()

    attempts = {
        "loss_closure": ({}, lambda o: o.step(lambda: F.cross_entropy(net(X), Y))),
        "graph": ({}, graph_step),
        "exact": ({"hvp": "exact"}, lambda o: stepper("rank_one", net, o, X, Y)()),
    }
    for name, (kwargs, attempt) in attempts.items():
        try:
            attempt(RankOneNewton(list(net.parameters()), **kwargs))
        except CurvatureError as exc:
            messages[name] = str(exc)
        else:
            messages[name] = None
    return {"messages": messages, "unchanged": torch.equal(flat(net), before)}


def _mismatch(params_of_rank: Callable[[nn.Module, int], list]) -> dict:
    net = model()
    opt = RankOneNewton(params_of_rank(net, dist.get_rank()))
    X, Y = data(dist.get_rank(), dist.get_world_size())
    try:
        opt.step(lambda: F.cross_entropy(net(X), Y))
    except ReplicaMismatchError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


def scenario_mismatched_order(rank: int, world: int) -> dict:
    """Rank 1 passes the parameters in reverse order: same count, same element total."""
    return _mismatch(lambda net, r: list(net.parameters())[:: -1 if r == 1 else 1])


def scenario_extra_parameter(rank: int, world: int) -> dict:
    """Rank 1 passes one parameter more."""
    extra = [nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    return _mismatch(lambda net, r: list(net.parameters()) + (extra if r == 1 else []))


SCENARIOS = scenarios_in(globals())

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv, SCENARIOS))
