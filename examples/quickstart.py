"""Quick start: every torch_rankone optimizer next to Adam and torch.optim.LBFGS, on real data.

Two tasks, each trained from the same initialisation with every optimizer in ``OPTIMIZERS``:

1. ``logreg``: L2-regularised logistic regression (λ = 10⁻³, float64) on the LIBSVM mushrooms
   data (8124 × 112) when ``shared/data/libsvm`` is present, else on scikit-learn's bundled
   breast-cancer data (569 × 30, standardised);
2. ``mlp``: a 64-32-10 tanh MLP (float32, cross-entropy) on scikit-learn's bundled digits
   (1797 8×8 images).

A quarter of each dataset is held out for the test accuracy. Prints a table (final training
loss, its distance to the optimum for logistic regression, test accuracy, steps, wall time of
the steps), writes it as a CSV and plots the training loss against the step. Finishes in well
under two minutes on two CPU cores.

    python examples/quickstart.py [--out examples/output] [--quick]

Adding an optimizer is one line in ``OPTIMIZERS``: its class, how its closure is written and
its hyper-parameters per task (a task it has none for is skipped: NewtonLearn is for generalised
linear models, so it runs on ``logreg`` only, over 3 simulated nodes). FisherNewton takes
mini-batches of ``batch`` rows (its Woodbury solve is over the ``B × B`` Gram matrix of
per-sample gradients); the others use the full training set every step.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from _common import (
    LogisticRegression,
    load_breast_cancer,
    load_mushrooms,
    optimum,
    save_figure,
)
from torch import Tensor, nn

from torch_rankone import FisherNewton, NeumannIHVP, NewtonLearn, RankOneNewton
from torch_rankone.distributed import RandK

SEED = 0
LAM = 1e-3


@dataclass(frozen=True)
class Candidate:
    """An optimizer class, its closure convention and its hyper-parameters per task.

    ``closure``: ``"loss"`` returns the mean loss without ``backward`` (exact HVPs),
    ``"per_sample"`` returns the per-sample losses (FisherNewton), ``"backward"`` zeroes the
    gradients, calls ``backward()`` and returns the loss (Adam, LBFGS); ``"owns_data"``: no
    closure, the optimizer is built with the training data (NewtonLearn).
    """

    name: str
    cls: Callable[..., torch.optim.Optimizer]
    closure: str
    hyper: dict[str, dict[str, Any]]
    batch: int | None = None  # rows per step; None: the full training set


#: one iteration per step; tolerances below the defaults (1e-7, 1e-9), which stop it early
LBFGS = {"max_iter": 1, "line_search_fn": "strong_wolfe", "tolerance_grad": 1e-12,
         "tolerance_change": 1e-20}  # fmt: skip
OPTIMIZERS: list[Candidate] = [
    Candidate("RankOneNewton", RankOneNewton, "loss", {"logreg": {}, "mlp": {}}),
    # the tuning rule: the loss falls steadily but slowly on logistic regression, so lr × 3
    Candidate("FisherNewton", FisherNewton, "per_sample", {"logreg": {"lr": 3.0}, "mlp": {}},
              batch=128),
    # a convex, full-batch problem has no negative curvature: less damping, more Newton
    Candidate("NeumannIHVP", NeumannIHVP, "loss", {"logreg": {"damping": 0.01}, "mlp": {}}),
    Candidate("NewtonLearn", NewtonLearn, "owns_data",
              {"logreg": {"lam": LAM, "compressor": RandK(16), "num_nodes": 3}}),
    Candidate("Adam", torch.optim.Adam, "backward", {"logreg": {"lr": 0.1}, "mlp": {"lr": 0.01}}),
    Candidate("LBFGS", torch.optim.LBFGS, "backward", {"logreg": LBFGS, "mlp": LBFGS}),
]  # fmt: skip


@dataclass(frozen=True)
class Task:
    """A model to train on ``(X, y)`` split into train/test, with per-sample losses."""

    name: str
    data_name: str
    model: Callable[[], nn.Module]
    losses: Callable[[nn.Module, Tensor, Tensor], Tensor]
    predict: Callable[[nn.Module, Tensor], Tensor]
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    steps: int
    f_star: float | None = None  # the optimal training loss, where known


@dataclass
class Run:
    """One optimizer on one task: the training loss after every step, accuracy, time."""

    task: str
    optimizer: str
    f_star: float | None = None
    loss: list[float] = field(default_factory=list)
    accuracy: float = math.nan
    seconds: float = 0.0

    @property
    def gap(self) -> float:
        """Final training loss minus the optimum (NaN where the optimum is unknown)."""
        return math.nan if self.f_star is None else self.loss[-1] - self.f_star


def split(X: Tensor, y: Tensor, seed: int = SEED) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A stratified 75 / 25 train/test split."""
    from sklearn.model_selection import train_test_split

    X_tr, X_te, y_tr, y_te = train_test_split(
        X.numpy(), y.numpy(), test_size=0.25, random_state=seed, stratify=y.numpy()
    )
    return tuple(torch.from_numpy(a) for a in (X_tr, y_tr, X_te, y_te))


def logistic_losses(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``log(1 + exp(−y aᵀw)) + (λ/2)‖w‖²`` per row (labels ±1; the mean is ``P(w)``)."""
    w = model.weight
    return nn.functional.softplus(-y * model(X).squeeze(1)) + 0.5 * LAM * w.pow(2).sum()


def logreg_task(steps: int) -> Task:
    """Logistic regression on mushrooms, or on breast cancer where ../shared is absent."""
    data = load_mushrooms()
    name = "mushrooms" if data is not None else "breast-cancer (sklearn)"
    X, y = data if data is not None else load_breast_cancer()

    def model() -> nn.Module:
        linear = nn.Linear(X.shape[1], 1, bias=False).to(torch.float64)
        nn.init.zeros_(linear.weight)
        return linear

    X_train, y_train, X_test, y_test = split(X, y)
    _, p_star = optimum(LogisticRegression(X_train, y_train, LAM))
    return Task(
        "logreg",
        name,
        model,
        logistic_losses,
        lambda m, X: torch.where(m(X).squeeze(1) >= 0, 1.0, -1.0).to(X.dtype),
        X_train,
        y_train,
        X_test,
        y_test,
        steps,
        p_star,
    )


def mlp_task(steps: int) -> Task:
    """A 64-32-10 tanh MLP on scikit-learn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    return Task(
        "mlp",
        "digits (sklearn)",
        model,
        lambda m, X, y: nn.functional.cross_entropy(m(X), y, reduction="none"),
        lambda m, X: m(X).argmax(1),
        *split(X, torch.tensor(y)),
        steps,
    )


def make_closure(
    cand: Candidate, task: Task, model: nn.Module, opt: torch.optim.Optimizer, rows: Tensor | None
) -> Callable[[], Tensor]:
    """The closure ``cand`` expects, on the rows ``rows`` (all training rows for ``None``)."""
    X, y = task.X_train, task.y_train
    if rows is not None:
        X, y = X[rows], y[rows]
    if cand.closure == "per_sample":
        return lambda: task.losses(model, X, y)
    if cand.closure == "loss":
        return lambda: task.losses(model, X, y).mean()

    def backward() -> Tensor:
        opt.zero_grad()
        loss = task.losses(model, X, y).mean()
        loss.backward()
        return loss

    return backward


def train(cand: Candidate, task: Task) -> Run:
    """``task.steps`` steps of ``cand`` from the task's fixed initialisation; steps are timed."""
    torch.manual_seed(SEED)
    model = task.model()
    data = (task.X_train, task.y_train) if cand.closure == "owns_data" else ()
    opt = cand.cls(model.parameters(), *data, **cand.hyper[task.name])
    batches = torch.Generator().manual_seed(SEED)
    run = Run(task.name, cand.name, task.f_star)

    def record() -> None:
        with torch.no_grad():
            run.loss.append(float(task.losses(model, task.X_train, task.y_train).mean()))

    record()
    for _ in range(task.steps):
        rows = None
        if cand.batch is not None:
            rows = torch.randint(len(task.y_train), (cand.batch,), generator=batches)
        closure = None if data else make_closure(cand, task, model, opt, rows)
        t0 = time.perf_counter()
        opt.step(closure)
        run.seconds += time.perf_counter() - t0
        record()
    with torch.no_grad():
        run.accuracy = float((task.predict(model, task.X_test) == task.y_test).double().mean())
    return run


def plot(runs: Sequence[Run], tasks: Sequence[Task], path: Path) -> Path:
    """Training loss minus its optimum (0 where unknown) against the step, a panel per task."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2))
    for ax, task in zip(axes, tasks):
        f_star = task.f_star or 0.0
        for run in (r for r in runs if r.task == task.name):
            ax.semilogy([v - f_star for v in run.loss], label=run.optimizer)
        ylabel = "training loss" if task.f_star is None else "training loss − optimum"
        ax.set(xlabel="step", ylabel=ylabel, title=f"{task.name}: {task.data_name}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_table(runs: Sequence[Run], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(
            ["task", "optimizer", "final_loss", "gap", "test_accuracy", "steps", "seconds"]
        )
        for r in runs:
            row = [r.loss[-1], r.gap, r.accuracy, len(r.loss) - 1, r.seconds]
            out.writerow([r.task, r.optimizer, *row])
    return path


def print_table(runs: Sequence[Run], tasks: Sequence[Task]) -> None:
    data = {t.name: t.data_name for t in tasks}
    """The table; ``loss − opt.`` is the final training loss minus its optimum (logreg)."""
    print(f"{'task':28s} {'optimizer':14s} {'final loss':>11s} {'loss − opt.':>11s} "
          f"{'test acc':>9s} {'steps':>6s} {'time s':>7s}")  # fmt: skip
    for r in runs:
        print(
            f"{r.task + ', ' + data[r.task]:28s} {r.optimizer:14s} {r.loss[-1]:11.4e} "
            f"{r.gap:11.2e} {r.accuracy:9.4f} {len(r.loss) - 1:6d} {r.seconds:7.2f}"
        )


def main(argv: Sequence[str] | None = None) -> list[Run]:
    """Train every optimizer on both tasks; print and save the table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    parser.add_argument("--quick", action="store_true", help="20 steps per run (smoke test)")
    args = parser.parse_args(argv)
    tasks = [logreg_task(20 if args.quick else 200), mlp_task(20 if args.quick else 500)]
    runs = [train(cand, task) for task in tasks for cand in OPTIMIZERS if task.name in cand.hyper]
    print_table(runs, tasks)
    files = [
        write_table(runs, args.out / "quickstart.csv"),
        plot(runs, tasks, args.out / "quickstart.png"),
    ]
    print("wrote " + ", ".join(str(p) for p in files))
    return runs


if __name__ == "__main__":
    main()
