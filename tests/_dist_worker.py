"""Worker and shared scenarios for ``tests/test_distributed.py`` (SPEC §4, data parallel).

Run as ``python _dist_worker.py RANK WORLD STORE OUT SCENARIO...``: joins a gloo process group
through the rendezvous store the parent test serves (``STORE`` is ``tcp:PORT``, a TCPStore on
``127.0.0.1:PORT``, or ``file:PATH``, a FileStore), runs the scenarios on this rank's shard of
the batch and ``torch.save``s their outcomes to ``OUT`` (see :func:`main`). The same ``run_*``
functions give the parent its single-process reference on the union batch, so both sides differ
only in where the rows live.
"""

from __future__ import annotations

import datetime
import math
import sys

import torch
import torch.distributed as dist
from _dist_harness import scenarios_in, worker_main
from _optim_problems import MLPProblem, PaperRankOneNewton

from torch_rankone import FisherNewton, NeumannIHVP
from torch_rankone._tensorlist import flatten

STEPS = 5
BATCH = 16  # the union batch; rank r holds rows [r·B/W, (r+1)·B/W) unless told otherwise
UNEQUAL = (10, 6)  # rows per rank in the unequal-batch scenario: rank 0 rows 0-9, rank 1 10-15
INF_AT = 2  # the step (0-based) at which rank 1's loss is +inf in the non-finite-loss scenario


def make_problem(
    rank: int | None = None, world: int = 1, sizes: tuple[int, ...] | None = None
) -> MLPProblem:
    """The 16-sample MLP problem (same model and data everywhere); a rank keeps its rows, the
    next ``sizes[rank]`` after those of the lower ranks (equal shares if ``sizes`` is None)."""
    prob = MLPProblem(seed=0, batch=BATCH)
    if rank is not None:
        sizes = (BATCH // world,) * world if sizes is None else sizes
        assert len(sizes) == world and sum(sizes) == BATCH, (sizes, world)
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        prob.X, prob.Y = prob.X[rows], prob.Y[rows]
    return prob


def _inf_loss(loss_fn):
    """The loss plus ``+inf``: non-finite, while its gradient and HVPs stay those of ``loss_fn``."""
    return lambda: loss_fn() + math.inf


def _record(prob: MLPProblem, traj: list, losses: list, **extra) -> dict:
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in prob.params]
    return {
        "trajectory": torch.stack(traj),  # (STEPS, N): the parameters after each step
        "losses": torch.stack(losses) if losses and losses[0] is not None else None,
        "grad": flatten(grads).clone(),  # what .grad holds after the last step
        "initial_seed": torch.initial_seed(),
        **extra,
    }


def run_rank_one(
    prob: MLPProblem,
    mode: str,
    *,
    seed: int,
    gen_seed: int | None = None,
    hvp: str = "auto",
    process_group=None,
    model: torch.nn.Module | None = None,
    theory: bool = False,
    inf_at: int | None = None,
) -> dict:
    """STEPS RankOneNewton steps from the problem's start through curvature source ``mode``:
    ``"loss_closure"``, ``"graph"`` (``backward(create_graph=True)`` then ``step()``) or
    ``"backward"`` (zero_grad/backward/return loss, through ``model`` — e.g. a DDP wrapper).

    ``seed`` goes to ``torch.manual_seed`` right before the optimizer is built (its owned
    generator is seeded from ``torch.initial_seed()``); ``gen_seed`` passes an explicit one.
    ``inf_at``: the step at which the loss closure returns ``+inf`` (finite gradient and HVPs).
    """
    torch.manual_seed(seed)
    gen = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
    damping = (
        dict(damping_mode="theory", hessian_lipschitz=1.0, lambda_max_refresh=2)
        if theory
        else dict(damping=0.5)
    )
    opt = PaperRankOneNewton(
        prob.params, lr=1.0, hvp=hvp, generator=gen, process_group=process_group, **damping
    )
    model = prob.model if model is None else model

    def backward_closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(prob.X), prob.Y)
        loss.backward()
        return loss

    traj, losses = [], []
    for k in range(STEPS):
        if mode == "graph":
            opt.zero_grad()
            prob.loss().backward(create_graph=True)
            loss = opt.step()
        elif mode == "loss_closure":
            loss = opt.step(_inf_loss(prob.loss) if k == inf_at else prob.loss)
        elif mode == "backward":
            loss = opt.step(backward_closure)
        else:
            raise ValueError(mode)
        traj.append(prob.flat().clone())
        losses.append(loss)
    return _record(
        prob,
        traj,
        losses,
        safeguard_hits=int(opt.global_state.get("safeguard_hits", 0)),
        skipped_steps=int(opt.global_state.get("skipped_steps", 0)),
        lambda_max=float(opt.global_state.get("lambda_max", float("nan"))),
    )


def run_fisher(prob: MLPProblem, *, seed: int, process_group=None, module: bool = False) -> dict:
    """STEPS FisherNewton steps (empirical Fisher) from the problem's start; ``module=True``
    passes the model, so its ``nn.Linear`` layers use implicit per-sample rows (inputs and
    output gradients are what gets all-gathered then)."""
    torch.manual_seed(seed)
    opt = FisherNewton(
        prob.params,
        lr=1.0,
        damping=0.1,
        process_group=process_group,
        module=prob.model if module else None,
    )
    traj, losses = [], []
    for _ in range(STEPS):
        losses.append(opt.step(prob.per_sample_losses))
        traj.append(prob.flat().clone())
    return _record(prob, traj, losses)


def run_neumann(prob: MLPProblem, *, seed: int, inf_at: int | None = None) -> dict:
    """STEPS NeumannIHVP steps; the scale is estimated by power iteration every 2 steps (start
    vector from the optimizer's generator, HVPs averaged across ranks). ``inf_at``: the step at
    which the loss closure returns ``+inf`` (finite gradient and HVPs)."""
    torch.manual_seed(seed)
    opt = NeumannIHVP(prob.params, lr=1.0, damping=0.5, num_terms=5, scale_refresh=2)
    traj, losses = [], []
    for k in range(STEPS):
        losses.append(opt.step(_inf_loss(prob.loss) if k == inf_at else prob.loss))
        traj.append(prob.flat().clone())
    return _record(
        prob,
        traj,
        losses,
        scale=float(opt.global_state["scale"]),
        skipped_steps=int(opt.global_state.get("skipped_steps", 0)),
    )


# ------------------------------------------------------------------------------------------------
# Scenarios: what each rank runs. Ranks are seeded differently on purpose (torch.manual_seed(rank))
# so that only the optimizer's broadcast of its generator makes the directions agree.
# ------------------------------------------------------------------------------------------------


def scenario_rank_one_loss_closure(rank: int, world: int) -> dict:
    return run_rank_one(make_problem(rank, world), "loss_closure", seed=rank)


def scenario_rank_one_graph(rank: int, world: int) -> dict:
    return run_rank_one(make_problem(rank, world), "graph", seed=rank)


def scenario_rank_one_explicit_generator(rank: int, world: int) -> dict:
    return run_rank_one(make_problem(rank, world), "loss_closure", seed=rank, gen_seed=7)


def scenario_rank_one_theory(rank: int, world: int) -> dict:
    """Theory damping with λ_max estimated by power iteration (its start vector comes from the
    optimizer's generator, its HVPs are averaged), refreshed every 2 steps."""
    prob = make_problem(rank, world)
    return run_rank_one(prob, "loss_closure", seed=rank, theory=True)


def scenario_neumann(rank: int, world: int) -> dict:
    return run_neumann(make_problem(rank, world), seed=rank)


def scenario_ddp_fd(rank: int, world: int) -> dict:
    prob = make_problem(rank, world)
    ddp = torch.nn.parallel.DistributedDataParallel(prob.model)
    return run_rank_one(prob, "backward", seed=rank, hvp="fd", model=ddp)


def scenario_process_group(rank: int, world: int) -> dict:
    """RankOneNewton given ``process_group=``: a singleton group (no averaging, no broadcast, so
    each rank follows its own shard and its own seed) and an explicit group of all ranks."""
    singletons = [dist.new_group([r]) for r in range(world)]  # collective: every rank makes all
    everyone = dist.new_group(list(range(world)))
    prob = make_problem(rank, world)
    own = run_rank_one(prob, "loss_closure", seed=rank, process_group=singletons[rank])
    prob = make_problem(rank, world)
    return {
        "own": own,
        "all": run_rank_one(prob, "loss_closure", seed=rank, process_group=everyone),
    }


def scenario_fisher(rank: int, world: int) -> dict:
    """FisherNewton on the world group (materialised and implicit per-sample rows), then on a
    singleton ``process_group=``."""
    union = run_fisher(make_problem(rank, world), seed=rank)
    union_module = run_fisher(make_problem(rank, world), seed=rank, module=True)
    singletons = [dist.new_group([r]) for r in range(world)]
    own = run_fisher(make_problem(rank, world), seed=rank, process_group=singletons[rank])
    return {"union": union, "union_module": union_module, "own": own}


def scenario_fisher_unequal_batches(rank: int, world: int) -> dict:
    """FisherNewton with 10 rows on rank 0 and 6 on rank 1 (materialised and implicit rows):
    ``all_gather`` needs equal shapes, and each rank's mean counts by its share of the batch."""
    return {
        "rows": run_fisher(make_problem(rank, world, UNEQUAL), seed=rank),
        "module": run_fisher(make_problem(rank, world, UNEQUAL), seed=rank, module=True),
    }


def scenario_nonfinite_loss_on_one_rank(rank: int, world: int) -> dict:
    """Only rank 1's loss is non-finite (``+inf`` at step INF_AT, gradient and HVPs finite):
    the loss is averaged with the gradient, so every rank sees ``inf`` and skips the step."""
    inf_at = INF_AT if rank == 1 else None
    prob = make_problem(rank, world)
    rank_one = run_rank_one(prob, "loss_closure", seed=rank, inf_at=inf_at)
    return {
        "rank_one": rank_one,
        "neumann": run_neumann(make_problem(rank, world), seed=rank, inf_at=inf_at),
    }


def scenario_rank_one_generator_per_rank(rank: int, world: int) -> dict:
    """``generator=Generator().manual_seed(100 + rank)``, a generator seeded per rank: the
    optimizer broadcasts its state from rank 0 at the first step."""
    return run_rank_one(make_problem(rank, world), "loss_closure", seed=rank, gen_seed=100 + rank)


def scenario_failing_rank(rank: int, world: int) -> dict:
    """Harness check, run last: rank 1 fails; rank 0 must see an error in its collective (the
    peer went away, or a 5 s timeout), not hang."""
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    work = dist.all_reduce(torch.zeros(1), async_op=True)
    work.wait(timeout=datetime.timedelta(seconds=5))
    return {}


SCENARIOS = scenarios_in(globals())


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv, SCENARIOS))
