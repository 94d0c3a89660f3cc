"""NewtonLearn (NL1, NL2, CNL) on a real LIBSVM dataset, over torch.distributed or simulated nodes.

L2-regularised logistic regression split into ``n`` nodes of ``m`` rows as in the paper
(Islamov, Qian & Richtárik, 2021, §4: a9a n = 80, m = 407; w8a n = 142, m = 350; the remainder
rows are dropped),
RandK(1) messages, ``λ = 1e-3``, run until ``P(x) − P* ≤ tol`` (``P*``: 20 float64 Newton
iterations on the same rows). Prints iterations, communicated bits and wall time per variant.

    # 4 processes on this machine (gloo; NCCL with --device cuda), 20 nodes per rank:
    torchrun --nproc_per_node=4 examples/newton_learn_distributed.py --dataset a9a
    # the same in one process, nodes simulated (vectorised over nodes):
    python examples/newton_learn_distributed.py --dataset a9a
    # w8a, CNL from a far start, history written as CSV:
    python examples/newton_learn_distributed.py --dataset w8a --variants cnl --start 3 --out out/

Under torchrun every rank loads the file and keeps its own consecutive nodes; rank 0 is the
server (it aggregates with collectives and broadcasts x) and prints. The iterates equal the
simulated run's for the same seed.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from torch_rankone import NewtonLearn
from torch_rankone.data import libsvm
from torch_rankone.distributed import RandK
from torch_rankone.glm import glm_newton

PAPER_SPLITS = {"a9a": (80, 407), "w8a": (142, 350), "a7a": (100, 161), "a2a": (15, 151)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="a9a")
    ap.add_argument("--nodes", type=int, help="total nodes n (default: the paper's split)")
    ap.add_argument("--rows-per-node", type=int, help="m (default: the paper's split)")
    ap.add_argument("--variants", default="nl1,nl2,cnl")
    ap.add_argument("--lam", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=1, help="RandK(r)")
    ap.add_argument("--start", type=float, default=0.0, help="x0 = start·1")
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--max-iters", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (NCCL under torchrun)")
    ap.add_argument("--out", type=Path, help="folder for the per-iteration CSV histories")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun sets both
    device = torch.device(args.device)
    if launched:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    try:
        return run(args, rank, world, device)
    finally:
        if launched:
            dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[dict]:
    n, m = PAPER_SPLITS.get(args.dataset, (None, None))
    n, m = args.nodes or n, args.rows_per_node or m
    if n is None or m is None:
        raise SystemExit(f"give --nodes and --rows-per-node for {args.dataset}")
    if n % world:
        raise SystemExit(f"--nodes {n} is not divisible by the {world} processes")
    A, b = libsvm(args.dataset, dtype=torch.float64)
    if n * m > A.shape[0]:
        raise SystemExit(f"{args.dataset} has {A.shape[0]} rows, fewer than n·m = {n * m}")
    A, b = A[: n * m].contiguous(), b[: n * m].contiguous()  # drop the remainder (paper)
    _, values = glm_newton(A, b, lam=args.lam, iterations=20)
    p_star = values[-1]
    per_rank = n // world * m
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    A, b = A[shard].to(device), b[shard].to(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(
        f"{args.dataset}: n={n} nodes x m={m} rows, d={A.shape[1]}, lambda={args.lam}, "
        f"RandK({args.r}), {f'{world} processes' if world > 1 else 'simulated nodes'}, "
        f"P*={p_star:.15f}"
    )
    results = []
    for variant in args.variants.split(","):
        x = torch.full((A.shape[1],), args.start, dtype=torch.float64, device=device)
        x.requires_grad_(True)
        start = time.perf_counter()
        opt = NewtonLearn(
            [x],
            A,
            b,
            lam=args.lam,
            variant=variant,
            compressor=RandK(args.r),
            num_nodes=n // world,
            generator=torch.Generator().manual_seed(args.seed),
        )
        gap = float("inf")
        while gap > args.tol and len(opt.history) < args.max_iters:
            gap = float(opt.step()) - p_star
        seconds = time.perf_counter() - start
        row = dict(
            variant=variant,
            iterations=len(opt.history),
            gap=gap,
            bits=float(opt.state[x]["bits_sent"]),
            seconds=seconds,
            x=x.detach().cpu().clone(),
        )
        results.append(row)
        say(
            f"{variant:>4}: {row['iterations']:5d} iterations  P-P*={gap:9.2e}  "
            f"{row['bits']:10.4g} bits (all nodes)  {seconds:7.2f} s"
        )
        if args.out is not None and rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"newton_learn_{args.dataset}_{variant}.csv"
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["iteration", "P_minus_Pstar", "bits", "seconds"])
                for k, h in enumerate(opt.history):
                    w.writerow([k, h["loss"] - p_star, h["bits"], h["time"]])
    return results


if __name__ == "__main__":
    main()
