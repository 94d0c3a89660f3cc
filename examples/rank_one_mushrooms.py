"""Reproduces the experiments of the slides "Rank-one approximation of the Hessian"
(A. Semenov, 2025).

Two problems, each optimised from x⁰ = 0 (x⁰ = 3 in 1-D) in float64:

1. a 1-D function with positive Hessian and known Hessian-Lipschitz constant,
   ``f(x) = log cosh(x) + x²/20`` (``f'' = sech²x + 1/10 > 0``, ``M = sup|f'''| = 4/(3√3)``,
   ``f* = 0``). In 1-D the symmetrised rank-one estimate is the Hessian itself, so RankOneNewton
   is damped Newton; plain Newton cycles between ±10 from x⁰ = 3.
2. L2-regularised logistic regression on the LIBSVM ``mushrooms`` data (8124 × 112, so the
   Hessian is 112 × 112), ``P(x) = mean_i log(1 + exp(−b_i a_iᵀx)) + (λ/2)‖x‖²``, λ = 10⁻³,
   ``P*`` from 30 exact Newton steps.

Methods: RankOneNewton with fixed α (the slides' step, lr = 1), with the slides' theory α
(``α_k = sqrt(M‖∇P‖/2) + σ``, ``σ = λ_max sqrt(N(N−1))``) and with tuned (α, lr); FisherNewton
(empirical Fisher on mini-batches of 128 rows, fixed and theory α); gradient descent with step
1/L and with a tuned step; exact Newton; ``torch.optim.LBFGS``. Writes suboptimality and
gradient-norm plots (PNG), every iterate's numbers (CSV) and prints a table.

    python examples/rank_one_mushrooms.py [--steps 1000] [--out examples/output] [--quick]

FisherNewton uses mini-batches: its Woodbury solve is over the B × B Gram matrix of the
per-sample gradients, O(B²N + B³) per step, so the full batch (B = 8124) costs ~80 s a step on
two CPU cores; with B = 128 a step takes ~25 ms. Its gradient is then a mini-batch gradient, so
it stalls at a noise floor (≈10⁻³ here) instead of converging.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import matplotlib.pyplot as plt
import torch
from _common import LogisticRegression, load_mushrooms, newton_iterates, optimum, save_figure
from torch import Tensor
from tqdm import tqdm

from torch_rankone import FisherNewton, RankOneNewton

LAM = 1e-3
SEED = 0
TABLE_STEPS = (50, 200, 1000)
#: FisherNewton's mini-batch size (see the module docstring)
FISHER_BATCH = 128
#: RankOneNewton, tuned: α = 50 exceeds the safeguard's |μ₋| = (N/2)(‖h‖ − hᵀu) (≤ 24 along
#: these runs), so D + αI ⪰ 26 I and the safeguard never fires; lr = 4α makes the step 4 in the
#: directions the rank-one estimate does not see. Used by the tests.
RANK_ONE_TUNED = {"damping": 50.0, "lr": 200.0}
#: FisherNewton: α = 0.1, the Newton step (lr = 1). Used by the tests.
FISHER_TUNED = {"damping": 0.1, "lr": 1.0, "damping_mode": "fixed"}
#: RankOneNewton with the slides' step (lr = 1) and these fixed α
FIXED_ALPHAS = (0.1, 1.0)
#: gradient descent's tuned step: the effective step of RANK_ONE_TUNED (lr/α = 4)
GD_TUNED_LR = 4.0
#: LBFGS's default tolerances (1e-7, 1e-9) stop it at P − P* ≈ 5e-10; these let it converge
LBFGS_TOL = {"tolerance_grad": 1e-12, "tolerance_change": 1e-20}
ONE_D_STEPS = 50
ONE_D_X0 = 3.0


class Problem(Protocol):
    """What the runners need: the objective, its gradient and Hessian (closed forms)."""

    @property
    def dim(self) -> int: ...

    def value(self, x: Tensor) -> Tensor: ...

    def grad(self, x: Tensor) -> Tensor: ...

    def hessian(self, x: Tensor) -> Tensor: ...


class LogCosh:
    """``f(x) = log cosh(x) + x²/20`` on ``x ∈ ℝ¹``: ``f'' ∈ (0.1, 1.1]``, ``f* = f(0) = 0``."""

    dim = 1
    smoothness = 1.1  # sup f'' = 1 + 1/10
    hessian_lipschitz = 4 / (3 * math.sqrt(3))  # sup |f'''| = sup 2 sech²x |tanh x|

    def value(self, x: Tensor) -> Tensor:
        return (torch.log(torch.cosh(x)) + x * x / 20).sum()

    def grad(self, x: Tensor) -> Tensor:
        return torch.tanh(x) + x / 10

    def hessian(self, x: Tensor) -> Tensor:
        return torch.diag(1 / torch.cosh(x) ** 2 + 0.1)


@dataclass
class Trace:
    """One run: ``P(x_k)``, ``‖∇P(x_k)‖`` and the cumulative step time, for ``k = 0..steps``."""

    method: str
    objective: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def record(self, problem: Problem, x: Tensor, seconds: float) -> None:
        with torch.no_grad():
            self.objective.append(float(problem.value(x)))
            self.grad_norm.append(float(problem.grad(x).norm()))
        self.seconds.append(seconds)


@dataclass(frozen=True)
class Method:
    """An optimizer to run on ``x``, and how its closure is written.

    ``closure`` is ``"loss"`` (returns ``P(x)``, no backward: RankOneNewton's exact-HVP
    source), ``"minibatch"`` (per-sample losses of ``FISHER_BATCH`` random rows: FisherNewton)
    or ``"backward"`` (zero the gradients, ``backward()``, return the loss: SGD, LBFGS).
    """

    name: str
    build: Callable[[list[Tensor]], torch.optim.Optimizer]
    closure: str


def make_closure(
    method: Method, problem: Problem, x: Tensor, opt: torch.optim.Optimizer, rows: torch.Generator
) -> Callable[[], Tensor]:
    """The closure for one step of ``method`` (a fresh mini-batch for ``"minibatch"``)."""
    if method.closure == "loss":
        return lambda: problem.value(x)
    if method.closure == "minibatch":
        batch = torch.randint(problem.A.shape[0], (FISHER_BATCH,), generator=rows)
        return lambda: problem.per_sample_losses(x, batch)

    def backward() -> Tensor:
        opt.zero_grad()
        loss = problem.value(x)
        loss.backward()
        return loss

    return backward


def run_optimizer(
    method: Method, problem: Problem, x0: Tensor, steps: int, seed: int, label: str
) -> Trace:
    """``steps`` optimizer steps on a parameter ``x`` starting at ``x0``; only steps are timed.

    ``seed`` fixes the random directions (RankOneNewton) and the mini-batches (FisherNewton).
    """
    torch.manual_seed(seed)
    x = x0.clone().requires_grad_()
    opt = method.build([x])
    rows = torch.Generator().manual_seed(seed)
    trace = Trace(method.name)
    trace.record(problem, x, 0.0)
    elapsed = 0.0
    for _ in tqdm(range(steps), desc=f"{label}: {method.name}", leave=False):
        closure = make_closure(method, problem, x, opt, rows)
        t0 = time.perf_counter()
        opt.step(closure)
        elapsed += time.perf_counter() - t0
        trace.record(problem, x, elapsed)
    return trace


def run_exact_newton(problem: Problem, x0: Tensor, steps: int) -> Trace:
    """Exact Newton with the closed-form Hessian (a dense solve per step), timed."""
    trace = Trace("exact Newton")
    t0 = time.perf_counter()
    xs = newton_iterates(problem, x0, steps)
    elapsed = time.perf_counter() - t0
    for k, x in enumerate(xs):
        trace.record(problem, x, elapsed * k / steps)
    return trace


def rank_one(name: str, **kwargs: float | str) -> Method:
    """RankOneNewton's isotropic step as the slides state it (``α = damping`` unless theory mode)
    with a loss closure (exact HVPs). Its random directions come from the generator it owns,
    seeded from ``torch.initial_seed()`` (set by :func:`run_optimizer`)."""
    kwargs = {"preconditioner": "isotropic", "damping_mode": "fixed", "lr": 1.0, **kwargs}
    return Method(name, lambda params: RankOneNewton(params, **kwargs), "loss")


def one_d_methods(f: LogCosh) -> list[Method]:
    """The slides' 1-D experiment: RankOneNewton (fixed and theory α), GD with step 1/L."""
    return [
        *(rank_one(f"RankOneNewton α={a:g}", damping=a) for a in FIXED_ALPHAS),
        rank_one(
            "RankOneNewton theory α",
            damping_mode="theory",
            hessian_lipschitz=f.hessian_lipschitz,
            lambda_max=f.smoothness,
        ),
        Method("GD 1/L", lambda p: torch.optim.SGD(p, lr=1 / f.smoothness), "backward"),
    ]


def rank_one_tuned() -> Method:
    """RankOneNewton with RANK_ONE_TUNED (the setting the tests check on mushrooms)."""
    return rank_one("RankOneNewton α=50, lr=200", **RANK_ONE_TUNED)


def fisher_tuned() -> Method:
    """FisherNewton with FISHER_TUNED on FISHER_BATCH-row mini-batches (checked by the tests)."""
    return Method("FisherNewton α=0.1", lambda p: FisherNewton(p, **FISHER_TUNED), "minibatch")


def mushrooms_methods(L: float, M: float) -> list[Method]:
    """Every method of the mushrooms table; ``L``, ``M`` feed theory α and GD's step 1/L."""
    return [
        *(rank_one(f"RankOneNewton α={a:g}", damping=a) for a in FIXED_ALPHAS),
        rank_one(
            "RankOneNewton theory α", damping_mode="theory", hessian_lipschitz=M, lambda_max=L
        ),
        rank_one_tuned(),
        fisher_tuned(),
        Method(
            "FisherNewton theory α",
            lambda p: FisherNewton(p, damping_mode="theory", hessian_lipschitz=M),
            "minibatch",
        ),
        Method("GD 1/L", lambda p: torch.optim.SGD(p, lr=1 / L), "backward"),
        Method(f"GD lr={GD_TUNED_LR:g}", lambda p: torch.optim.SGD(p, lr=GD_TUNED_LR), "backward"),
        Method(
            "torch.optim.LBFGS",
            lambda p: torch.optim.LBFGS(p, max_iter=1, line_search_fn="strong_wolfe", **LBFGS_TOL),
            "backward",
        ),
    ]


def run_all(
    methods: Sequence[Method], problem: Problem, x0: Tensor, steps: int, seed: int, label: str
) -> list[Trace]:
    traces = [run_optimizer(m, problem, x0, steps, seed, label) for m in methods]
    return [*traces, run_exact_newton(problem, x0, steps)]


def plot(traces: Sequence[Trace], f_star: float, title: str, path: Path) -> Path:
    """Suboptimality and gradient norm against iterations, log scale."""
    fig, (ax_f, ax_g) = plt.subplots(1, 2, figsize=(12, 4.5))
    subs = [[v - f_star for v in t.objective] for t in traces]
    for t, sub in zip(traces, subs):
        ax_f.semilogy(sub, label=t.method)
        ax_g.semilogy(t.grad_norm, label=t.method)
    ax_f.set(xlabel="iteration", ylabel="f(x) − f*", title=f"{title}: suboptimality")
    ax_g.set(xlabel="iteration", ylabel="‖∇f(x)‖", title=f"{title}: gradient norm")
    for ax, ys in ((ax_f, subs), (ax_g, [t.grad_norm for t in traces])):
        # from rounding level to the largest value; zeros (exact optima) are not drawn
        ax.set_ylim(1e-17, 10 * max(max(y) for y in ys))
        ax.grid(True, which="major", alpha=0.3)
    ax_g.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def write_csv(rows: dict[str, tuple[Sequence[Trace], float]], path: Path) -> Path:
    """One row per problem, method and iterate: objective, suboptimality, gradient norm, time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(
            ["problem", "method", "step", "objective", "suboptimality", "grad_norm", "seconds"]
        )
        for problem, (traces, f_star) in rows.items():
            for t in traces:
                for k, (f, g, s) in enumerate(zip(t.objective, t.grad_norm, t.seconds)):
                    out.writerow([problem, t.method, k, f"{f:.17g}", f"{f - f_star:.6e}", g, s])
    return path


def table(traces: Sequence[Trace], f_star: float) -> str:
    """Markdown: f(x_k) − f* after the TABLE_STEPS that were run, and the run's step time."""
    steps = len(traces[0].objective) - 1
    cols = [k for k in TABLE_STEPS if k <= steps] or [steps]
    head = "| method | " + " | ".join(f"f − f* after {k}" for k in cols) + " | time (s) |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1)]
    for t in traces:
        subs = " | ".join(f"{t.objective[k] - f_star:.2e}" for k in cols)
        lines.append(f"| {t.method} | {subs} | {t.seconds[-1]:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    parser.add_argument("--steps", type=int, default=1000, help="iterations on mushrooms")
    parser.add_argument("--seed", type=int, default=SEED, help="random directions, mini-batches")
    parser.add_argument("--quick", action="store_true", help="30 steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 30
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[list[Trace], float]]:
    """Run both experiments; return ``{problem: (traces, f*)}``."""
    args = parse_args(argv)
    data = load_mushrooms()
    if data is None:
        raise SystemExit("mushrooms not found: put mushrooms.gz in shared/data/libsvm")

    f = LogCosh()
    x0_1d = torch.tensor([ONE_D_X0], dtype=torch.float64)
    one_d = run_all(one_d_methods(f), f, x0_1d, ONE_D_STEPS, args.seed, "1-D")

    problem = LogisticRegression(*data, lam=LAM)
    L, M = problem.smoothness(), problem.hessian_lipschitz()
    _, p_star = optimum(problem)
    x0 = torch.zeros(problem.dim, dtype=torch.float64)
    mush = run_all(mushrooms_methods(L, M), problem, x0, args.steps, args.seed, "mushrooms")

    results = {"1d": (one_d, 0.0), "mushrooms": (mush, p_star)}
    args.out.mkdir(parents=True, exist_ok=True)
    files = [
        plot(one_d, 0.0, "f(x) = log cosh x + x²/20, x⁰ = 3", args.out / "rank_one_1d.png"),
        plot(mush, p_star, "mushrooms, λ = 1e-3", args.out / "rank_one_mushrooms.png"),
        write_csv(results, args.out / "rank_one_mushrooms.csv"),
    ]
    sigma = L * math.sqrt(problem.dim * (problem.dim - 1))
    print(f"1-D, f(x) = log cosh x + x²/20 from x⁰ = {ONE_D_X0}: f(x_k) after {ONE_D_STEPS} steps")
    print(table(one_d, 0.0))
    print(
        f"\nmushrooms: N = {problem.dim}, λ = {LAM}, P* = {p_star:.15f}, "
        f"P(x⁰) − P* = {float(problem.value(x0)) - p_star:.4f}; L = {L:.4f}, M = {M:.4f}, "
        f"theory σ = L·sqrt(N(N−1)) = {sigma:.1f}; seed {args.seed}"
    )
    print(table(mush, p_star))
    print("\nwrote " + ", ".join(str(p) for p in files))
    return results


if __name__ == "__main__":
    main()
