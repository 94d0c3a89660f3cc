"""The peer benchmark's workloads: a model, its data and its budget, deterministic per seed.

Every workload is a classification problem trained with the mean cross-entropy of the logits
the model returns. The data (and the train/test split) is fixed; the seed sets the model's
initialisation, the order of the mini-batches and every random draw during training.

==========  ==================================================  =====  =====  ======
name        model / data                                        batch  steps  target
==========  ==================================================  =====  =====  ======
``mlp``     64-64-64-10 tanh MLP (9.0k parameters), digits      128    330    0.15
``cnn``     conv 1→16→32 3×3 + ReLU, max-pool, 512-32-10        64     225    0.15
            (21.5k parameters), digits as 8×8 images
``bert``    BERT, 2 layers, hidden 64, 2 heads, FFN 128,        64     160    0.1
            vocabulary 50, length 16 (75.7k parameters),
            synthetic order task
``w8a``     300-64-2 tanh MLP (19.4k parameters), LIBSVM w8a    256    600    0.06
==========  ==================================================  =====  =====  ======

*steps* is the budget in mini-batch iterations (LBFGS: closure evaluations), *target* the
training loss of the time-to-target column: one that Adam from its defaults reaches within the
budget.

* Digits: scikit-learn's bundled 1797 8×8 images, an 80/20 stratified split with
  ``random_state=0``, pixels scaled to [0, 1]. mlp: 30 epochs of 11 batches (after 15, Adam's
  defaults are at 93 % test accuracy); cnn: 10 epochs of 22 batches.
* bert: 2048 training and 1024 test sequences drawn once from a fixed generator,
  ``[CLS] t_1 .. t_15`` with ordinary tokens uniform over ids 4..49 and exactly two markers
  ``A``, ``B`` at distinct random positions, labelled 1 when ``A`` comes first (balanced; a
  bag-of-tokens model is at chance: attention must compare positions); five epochs.
  ``transformers.BertForSequenceClassification`` from a config (eager attention, default
  dropout 0.1).
* w8a: 49,749 training rows and the 14,951 of ``w8a.t`` (a fixed 80/20 split of ``w8a`` if the
  test file is absent), sparse binary features made dense float32, labels 97 % negative, so the
  test metric is the balanced accuracy; three epochs (the balanced accuracy keeps rising long
  after the loss flattens).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["WORKLOADS", "Problem", "Workload", "accuracy", "balanced_accuracy", "batches"]


@dataclass
class Problem:
    """A model (returning logits) and its data; ``x``/``y`` tensors index along dimension 0."""

    model: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    batch_size: int


@dataclass(frozen=True)
class Workload:
    """``build(seed)`` makes the problem (model initialised from ``seed``); ``steps`` is the
    budget in mini-batch iterations (LBFGS: closure evaluations), ``quick_steps`` the smoke-test
    budget; ``target_loss`` the training loss for the time-to-target column; ``metric``
    ``"accuracy"`` or ``"balanced_accuracy"``; ``unavailable()`` returns why the workload cannot
    run here (missing data or package), or ``None``."""

    name: str
    title: str
    build: Callable[[int], Problem]
    steps: int
    target_loss: float
    metric: str = "accuracy"
    quick_steps: int = 3
    unavailable: Callable[[], str | None] = lambda: None


def batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless mini-batch indices: a fresh permutation of ``range(n)`` per epoch from a
    generator seeded with ``seed``; the incomplete last batch of an epoch is dropped."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def balanced_accuracy(logits: Tensor, y: Tensor) -> float:
    """Mean over classes of the recall (w8a is 97 % negative: plain accuracy would say little)."""
    pred = logits.argmax(1)
    recalls = [(pred[y == c] == c).float().mean() for c in y.unique()]
    return float(torch.stack(recalls).mean())


# ---- digits ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    f = lambda a: torch.as_tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return f(Xtr), i(ytr), f(Xte), i(yte)


def _need(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[bench]')"
        return None

    return check


def mlp_digits(seed: int) -> Problem:
    Xtr, ytr, Xte, yte = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    return Problem(model, Xtr, ytr, Xte, yte, batch_size=128)


def cnn_digits(seed: int) -> Problem:
    Xtr, ytr, Xte, yte = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    img = lambda a: a.view(-1, 1, 8, 8)  # noqa: E731
    return Problem(model, img(Xtr), ytr, img(Xte), yte, batch_size=64)


# ---- tiny BERT on a synthetic order task -------------------------------------------------------

VOCAB, SEQ_LEN, CLS, MARK_A, MARK_B = 50, 16, 1, 2, 3


def order_task(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences ``[CLS] t_1 .. t_15`` with markers ``A``, ``B`` at two distinct random
    positions and ordinary tokens (ids 4..49) elsewhere; label 1 iff ``A`` comes before ``B``."""
    x = torch.randint(4, VOCAB, (n, SEQ_LEN), generator=generator)
    x[:, 0] = CLS
    pos = torch.rand(n, SEQ_LEN - 1, generator=generator).argsort(1)[:, :2] + 1
    rows = torch.arange(n)
    x[rows, pos[:, 0]] = MARK_A
    x[rows, pos[:, 1]] = MARK_B
    return x, (pos[:, 0] < pos[:, 1]).long()


@functools.lru_cache(maxsize=1)
def _order_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return (*order_task(2048, gen), *order_task(1024, gen))


class SequenceClassifier(nn.Module):
    """``BertForSequenceClassification`` returning the logits tensor (not a ModelOutput)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids).logits


def tiny_bert(seed: int) -> Problem:
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    Xtr, ytr, Xte, yte = _order_data()
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = SequenceClassifier(BertForSequenceClassification(config))
    return Problem(model, Xtr, ytr, Xte, yte, batch_size=64)


# ---- w8a ---------------------------------------------------------------------------------------


def _w8a_unavailable() -> str | None:
    from torch_rankone.data import find_libsvm

    if find_libsvm("w8a") is None:
        return "LIBSVM w8a not found (no shared/data/libsvm; see docs/data.md)"
    return None


@functools.lru_cache(maxsize=1)
def _w8a() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from torch_rankone.data import find_libsvm, libsvm

    X, y = libsvm("w8a", dtype=torch.float32)
    y = (y > 0).long()
    if find_libsvm("w8a", "test") is not None:
        Xte, yte = libsvm("w8a", split="test", dtype=torch.float32)
        return X, y, Xte, (yte > 0).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return X[perm[:cut]], y[perm[:cut]], X[perm[cut:]], y[perm[cut:]]


def mlp_w8a(seed: int) -> Problem:
    Xtr, ytr, Xte, yte = _w8a()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(300, 64), nn.Tanh(), nn.Linear(64, 2))
    return Problem(model, Xtr, ytr, Xte, yte, batch_size=256)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "mlp",
            "MLP 64-64-64-10, digits",
            mlp_digits,
            steps=330,
            target_loss=0.15,
            unavailable=_need("sklearn"),
        ),
        Workload(
            "cnn",
            "CNN (21.5k), digits 8×8",
            cnn_digits,
            steps=225,
            target_loss=0.15,
            unavailable=_need("sklearn"),
        ),
        Workload(
            "bert",
            "tiny BERT (75.7k), order task",
            tiny_bert,
            steps=160,
            target_loss=0.1,
            unavailable=_need("transformers"),
        ),
        Workload(
            "w8a",
            "MLP 300-64-2, w8a",
            mlp_w8a,
            steps=600,
            target_loss=0.06,
            metric="balanced_accuracy",
            unavailable=_w8a_unavailable,
        ),
    )
}
