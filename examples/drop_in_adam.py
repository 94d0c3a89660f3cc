"""Drop-in replacement for ``torch.optim.Adam`` in a standard PyTorch training loop.

A 64-32-10 tanh MLP on scikit-learn's bundled digits (1797 8×8 images, a quarter held out),
mini-batches of 128, the same initialisation and batch order for every optimizer. The training
loop is the usual one; switching from Adam changes the optimizer line and one more line:

    -opt = torch.optim.Adam(model.parameters(), lr=0.01)
    +opt = RankOneNewton(model.parameters())  # or NeumannIHVP: defaults train
     ...
    -loss.backward()
    +loss.backward(create_graph=True)     # the gradient keeps its graph: exact HVPs in step()
     opt.step()

FisherNewton wants per-sample losses instead, passed as a closure (no backward)::

    +opt = FisherNewton(model.parameters(), module=model)
    +opt.step(lambda: F.cross_entropy(model(xb), yb, reduction="none"))

Prints test accuracy, final training loss and wall time per optimizer (about half a minute on
two CPU cores; ``--quick`` runs 2 epochs).

    python examples/drop_in_adam.py [--epochs 20] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton

SEED = 0
BATCH = 128

#: the one line that changes; every optimizer of this package with its defaults
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    "RankOneNewton": lambda m: RankOneNewton(m.parameters()),
    # module=: implicit per-sample gradients of the nn.Linear layers (same step, much faster)
    "FisherNewton": lambda m: FisherNewton(m.parameters(), module=m),
    "NeumannIHVP": lambda m: NeumannIHVP(m.parameters()),
}


@dataclass
class Result:
    optimizer: str
    accuracy: float
    loss: float
    seconds: float
    steps: int


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixels scaled to [0, 1]; a stratified 75 / 25 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    parts = train_test_split(X / 16.0, y, test_size=0.25, random_state=SEED, stratify=y)
    X_tr, X_te, y_tr, y_te = (torch.from_numpy(a) for a in parts)
    return X_tr.float(), y_tr, X_te.float(), y_te


def train(name: str, data: Sequence[Tensor], epochs: int) -> Result:
    """The standard loop; only the marked lines depend on the optimizer."""
    X_train, y_train, X_test, y_test = data
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = OPTIMIZERS[name](model)  # <- the drop-in line
    order = torch.Generator().manual_seed(SEED)
    steps, start = 0, time.perf_counter()
    for _ in range(epochs):
        for rows in torch.randperm(len(y_train), generator=order).split(BATCH):
            xb, yb = X_train[rows], y_train[rows]
            if isinstance(opt, FisherNewton):  # per-sample losses, no backward
                # step() calls the closure at once, so it sees this batch's xb, yb
                opt.step(lambda: F.cross_entropy(model(xb), yb, reduction="none"))  # noqa: B023
            else:
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward(create_graph=name != "Adam")  # <- graph for exact HVPs
                opt.step()
            steps += 1
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(X_test).argmax(1) == y_test).float().mean())
        loss = float(F.cross_entropy(model(X_train), y_train))
    return Result(name, accuracy, loss, seconds, steps)


def print_table(results: Sequence[Result]) -> None:
    print(f"| {'optimizer':14s} | test accuracy | train loss | steps | time (s) |")
    print(f"|{'-' * 16}|--------------:|-----------:|------:|---------:|")
    for r in results:
        print(
            f"| {r.optimizer:14s} | {r.accuracy:13.4f} | {r.loss:10.4f} | {r.steps:5d} "
            f"| {r.seconds:8.2f} |"
        )


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 epochs (smoke test)")
    args = parser.parse_args(argv)
    data = digits()
    results = [train(name, data, 2 if args.quick else args.epochs) for name in OPTIMIZERS]
    print_table(results)
    return results


if __name__ == "__main__":
    main()
