"""Every optimizer, built from its parameters only, trains ordinary networks: an MLP and a CNN on
scikit-learn's digits (training loss at least halved within 5 epochs, no skipped steps, fallbacks
and safeguard hits on at most 10 % of steps, finite parameters) and a tiny transformer (the loss
decreases)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton

OPTIMIZERS = {
    "RankOneNewton": lambda model: RankOneNewton(model.parameters()),
    "NeumannIHVP": lambda model: NeumannIHVP(model.parameters()),
    "FisherNewton": lambda model: FisherNewton(model.parameters(), module=model),
}


def _digits(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x.view(-1, 1, 8, 8)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )


def _step(name: str, opt, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> None:
    """One step in the convention each optimizer documents."""
    if name == "FisherNewton":
        opt.step(lambda: F.cross_entropy(model(xb), yb, reduction="none"))
    else:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward(create_graph=True)
        opt.step()


def _events(opt) -> dict[str, int]:
    keys = ("skipped_steps", "neumann_fallbacks", "safeguard_hits")
    return {k: int(opt.global_state[k]) for k in keys if k in opt.global_state}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_defaults_halve_the_training_loss_within_five_epochs(name, arch):
    torch.manual_seed(0)
    X, y = _digits()
    model = _mlp() if arch == "mlp" else _CNN()
    opt = OPTIMIZERS[name](model)
    batch = 128 if arch == "mlp" else 64
    with torch.no_grad():
        first = F.cross_entropy(model(X), y).item()
    gen = torch.Generator().manual_seed(0)
    steps = 0
    for _ in range(5):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), batch):
            idx = perm[i : i + batch]
            _step(name, opt, model, X[idx], y[idx])
            steps += 1
    with torch.no_grad():
        last = F.cross_entropy(model(X), y).item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert last < first / 2, (first, last)
    events = _events(opt)
    assert events.get("skipped_steps", 0) == 0, events
    assert events.get("neumann_fallbacks", 0) <= 0.1 * steps, events
    assert events.get("safeguard_hits", 0) <= 0.1 * steps, events


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_defaults_reduce_the_loss_of_a_tiny_transformer(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 16, (256, 12), generator=gen)
    labels = (ids == 2).any(1).long()  # does token 2 occur: learnable, not trivial at init
    model = _Logits(_tiny_bert())
    opt = OPTIMIZERS[name](model)
    model.eval()  # no dropout: the curvature of one batch is that of one function
    with torch.no_grad():
        first = F.cross_entropy(model(ids), labels).item()
    for _ in range(3):
        for i in range(0, len(ids), 64):
            _step(name, opt, model, ids[i : i + 64], labels[i : i + 64])
    with torch.no_grad():
        last = F.cross_entropy(model(ids), labels).item()
    assert last < first, (first, last)
    assert _events(opt).get("skipped_steps", 0) == 0
