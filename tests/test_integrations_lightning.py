"""SecondOrderCallback with a real ``lightning.Trainer`` on CPU.

A 2-16-3 tanh MLP learns a 3-class problem (Gaussian blobs); every optimizer fits it for a few
epochs under automatic optimization, logs its diagnostics to a CSVLogger, and resumes from a
Lightning checkpoint to the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton  # noqa: E402
from torch_rankone.integrations.lightning import SecondOrderCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated"),  # inside lightning 2.6
    # Lightning's advice about dataloader workers and tiny logging intervals
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
]

#: optimizer factories with hyper-parameters that fit the blobs in a few epochs
OPTIMIZERS = {
    "RankOneNewton": lambda ps: RankOneNewton(ps, lr=5.0, damping=5.0),
    "FisherNewton": lambda ps: FisherNewton(ps),  # the defaults
    "NeumannIHVP": lambda ps: NeumannIHVP(ps, lr=1.0, damping=1.0, num_terms=5),
    "RankOneNewton-fd": lambda ps: RankOneNewton(ps, lr=5.0, damping=5.0, hvp="fd"),
}


def blobs(n: int = 192, seed: int = 0) -> TensorDataset:
    """Three Gaussian blobs in the plane, well separated (learnable in a few epochs)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    return TensorDataset(centres[y] + 0.6 * torch.randn(n, 2, generator=g), y)


class Classifier(pl.LightningModule):
    """The usual LightningModule; ``per_sample`` returns unreduced losses (FisherNewton)."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = nn.functional.cross_entropy(self.net(x), y, reduction="none")
        self.log("train_loss", losses.mean(), on_step=False, on_epoch=True)
        return losses if self.optimizer == "FisherNewton" else losses.mean()

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.parameters())

    @torch.no_grad()
    def full_loss(self, data: TensorDataset) -> float:
        x, y = data.tensors
        return float(nn.functional.cross_entropy(self.net(x), y))


def make_trainer(tmp_path: Path, epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[SecondOrderCallback()],
        logger=CSVLogger(tmp_path, name="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def loader(data: TensorDataset) -> DataLoader:
    return DataLoader(data, batch_size=32, shuffle=False)  # fixed order: resumes comparable


def metrics_rows(trainer: pl.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fit_logs_and_resumes(tmp_path, name):
    """Loss decreases over a fit; diagnostics reach the logger's metrics.csv; resuming from a
    Lightning checkpoint continues the run: optimizer state (step counter, random generator)
    restored and the parameters equal to those of an uninterrupted run."""
    data = blobs()
    model = Classifier(name)
    loss0 = model.full_loss(data)
    trainer = make_trainer(tmp_path / "a", epochs=2)
    trainer.fit(model, loader(data))
    loss_mid = model.full_loss(data)
    assert loss_mid < 0.3 * loss0, (loss0, loss_mid)
    opt = trainer.optimizers[0]
    assert int(opt.global_state["step"]) == 12 and int(opt.global_state["skipped_steps"]) == 0

    rows = metrics_rows(trainer)
    logged = {k for row in rows for k, v in row.items() if v != ""}
    # safeguard_hits: isotropic RankOneNewton only (the default preconditioner has no safeguard)
    specific = {"RankOneNewton": ["damping"], "FisherNewton": ["damping"],
                "NeumannIHVP": ["scale", "neumann_fallbacks"]}  # fmt: skip
    keys = ["skipped_steps", "step_norm", *specific[name.removesuffix("-fd")]]
    expected = {"second_order/" + k for k in keys}
    assert expected <= logged, expected - logged
    norms = [float(r["second_order/step_norm"]) for r in rows if r["second_order/step_norm"]]
    assert len(norms) == 12 and all(v > 0 for v in norms)

    # resume: 2 epochs + checkpoint + 2 more, against 4 epochs in one go
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = Classifier(name)
    trainer_b = make_trainer(tmp_path / "b", epochs=4)
    trainer_b.fit(resumed, loader(data), ckpt_path=ckpt)
    straight = Classifier(name)
    make_trainer(tmp_path / "c", epochs=4).fit(straight, loader(data))
    assert int(trainer_b.optimizers[0].global_state["step"]) == 24
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed.full_loss(data) < loss_mid
    assert "backward" not in resumed.__dict__  # the callback undid its wiring


def test_exact_source_uses_graph_gradients(tmp_path):
    """With hvp='exact' the step must see graph gradients: it would raise CurvatureError on
    Lightning's plain backward closure, so a successful fit shows the callback's backward."""
    data = blobs(64)
    model = Classifier("RankOneNewton")
    model.configure_optimizers = lambda: RankOneNewton(
        model.parameters(), lr=1.0, damping=5.0, hvp="exact"
    )
    make_trainer(tmp_path, epochs=1).fit(model, loader(data))
    # and without the callback the same configuration is refused by the optimizer
    bare = Classifier("RankOneNewton")
    bare.configure_optimizers = lambda: RankOneNewton(bare.parameters(), hvp="exact")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="hvp='exact' cannot use a closure"):
        trainer.fit(bare, loader(data))


def test_refuses_fp16_loss_scaling(tmp_path):
    """precision='16-mixed' (a GradScaler) is refused with a message naming the alternative."""
    scaler = torch.amp.GradScaler("cpu")
    trainer = make_trainer(
        tmp_path, epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    with pytest.raises(RuntimeError, match="16-mixed.*bf16-mixed"):
        trainer.fit(Classifier("RankOneNewton"), loader(blobs(64)))


def test_fisher_pattern_errors(tmp_path):
    """FisherNewton: a scalar training_step loss, or gradient accumulation, is refused clearly."""
    data = blobs(64)

    class MeanLoss(Classifier):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    with pytest.raises(RuntimeError, match="per-sample losses"):
        make_trainer(tmp_path / "a", epochs=1).fit(MeanLoss("FisherNewton"), loader(data))
    trainer = make_trainer(tmp_path / "b", epochs=1, accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=1"):
        trainer.fit(Classifier("FisherNewton"), loader(data))


def test_bf16_mixed_trains(tmp_path):
    """bf16 autocast has no loss scaler: the exact source works as in fp32."""
    data = blobs()
    model = Classifier("RankOneNewton")
    loss0 = model.full_loss(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        make_trainer(tmp_path, epochs=2, precision="bf16-mixed").fit(model, loader(data))
    assert model.full_loss(data) < 0.7 * loss0


def _fisher_one_step(tmp_path: Path, optimizer=None, **trainer_kwargs):
    """One FisherNewton step (one batch of 32) under a Trainer; returns the parameter change,
    the gradient at the start and the optimizer."""
    data = blobs(32)
    model = Classifier("FisherNewton")
    if optimizer is not None:
        model.configure_optimizers = lambda: optimizer(model.parameters())
    x, y = data.tensors
    grads = torch.autograd.grad(nn.functional.cross_entropy(model.net(x), y), model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, epochs=1, **trainer_kwargs)
    trainer.fit(model, loader(data))
    step = torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(model.parameters(), before)])
    return step, torch.cat([g.reshape(-1) for g in grads]), trainer.optimizers[0]


def test_fisher_honours_gradient_clip_val(tmp_path):
    """Trainer(gradient_clip_val=c) clips the gradient FisherNewton's step uses by norm, as
    clip_grad_norm_ would: the step is min(1, c/(‖g‖ + 1e-6)) times the unclipped step."""
    full, g, opt = _fisher_one_step(tmp_path / "a")
    assert opt.param_groups[0]["max_grad_norm"] is None
    clip = 0.1 * float(g.norm())
    clipped, _, opt = _fisher_one_step(tmp_path / "b", gradient_clip_val=clip)
    assert opt.param_groups[0]["max_grad_norm"] == pytest.approx(clip)
    coef = clip / (float(g.norm()) + 1e-6)
    torch.testing.assert_close(
        clipped, coef * full, rtol=1e-4, atol=1e-4 * coef * float(full.abs().max())
    )
    same, _, _ = _fisher_one_step(tmp_path / "c", gradient_clip_val=10 * float(g.norm()))
    torch.testing.assert_close(same, full, rtol=1e-5, atol=1e-7)


def test_fisher_refuses_value_clipping_and_conflicting_norms(tmp_path):
    with pytest.raises(RuntimeError, match="gradient_clip_algorithm='norm'"):
        _fisher_one_step(tmp_path / "a", gradient_clip_val=0.5, gradient_clip_algorithm="value")
    with pytest.raises(RuntimeError, match="disagree"):
        _fisher_one_step(
            tmp_path / "b",
            optimizer=lambda ps: FisherNewton(ps, max_grad_norm=1.0),
            gradient_clip_val=0.5,
        )
