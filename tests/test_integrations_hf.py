"""SecondOrderTrainer with a real ``transformers.Trainer`` on CPU.

A 2-layer BERT (hidden size 16) built from a config — nothing downloaded — learns a synthetic
sequence-classification task (label: which half of the vocabulary the tokens come from).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton  # noqa: E402
from torch_rankone.integrations.hf import SecondOrderTrainer  # noqa: E402
from torch_rankone.optim import CurvatureError  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

VOCAB, LENGTH = 50, 8

#: optimizer factories with hyper-parameters that make progress on the task in a few steps
OPTIMIZERS = {
    # the isotropic rank-one step (relative damping: lr is an SGD learning rate)
    "RankOneNewton": lambda ps: RankOneNewton(ps, preconditioner="isotropic", lr=1.0),
    "FisherNewton": lambda ps: FisherNewton(ps, lr=3.0),
    "NeumannIHVP": lambda ps: NeumannIHVP(ps, lr=1.0, damping=1.0, num_terms=3),
}


class Sequences(torch.utils.data.Dataset):
    """``[CLS] t_1 .. t_7``, the tokens drawn from the lower (label 0) or upper (label 1) half
    of the vocabulary: learnable in a few steps by a tiny transformer (any attention pattern
    carries the answer to [CLS])."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        half = (VOCAB - 2) // 2
        offset = 2 + half * self.labels[:, None]
        self.ids = offset + torch.randint(0, half, (n, LENGTH), generator=g)
        self.ids[:, 0] = 1  # [CLS]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,  # deterministic steps: comparable runs
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        # exact HVPs differentiate the backward pass: the fused SDPA kernels have no double
        # backward, the eager attention has
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def training_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=8,
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**kwargs, **overrides})


@torch.no_grad()
def full_loss(model: torch.nn.Module, data: Sequences) -> float:
    model.eval()
    return float(model(input_ids=data.ids, labels=data.labels).loss)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train(tmp_path, name: str, scheduler=None, model=None, **overrides):
    model = tiny_bert() if model is None else model
    opt = OPTIMIZERS[name](model.parameters())
    sched = None if scheduler is None else scheduler(opt)
    trainer = SecondOrderTrainer(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=Sequences(),
        optimizers=(opt, sched),
    )
    return trainer, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trains_saves_and_resumes(tmp_path, name):
    """Loss decreases; save_model round-trips; resuming from the step-4 checkpoint ends at the
    parameters and optimizer step count of the uninterrupted 8-step run."""
    data = Sequences()
    trainer, opt = train(tmp_path / "run", name, save_strategy="steps", save_steps=4)
    loss0 = full_loss(trainer.model, data)
    trainer.train()
    loss = full_loss(trainer.model, data)
    assert loss < loss0 - 0.01, (loss0, loss)
    assert int(opt.global_state["step"]) == 8 and int(opt.global_state["skipped_steps"]) == 0
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 8 and all(0 < v < 1 for v in logged)

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "saved")
    for p, q in zip(reloaded.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    resumed, opt_b = train(tmp_path / "run", name, model=tiny_bert(seed=1))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert int(opt_b.global_state["step"]) == 8
    for p, q in zip(resumed.model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class GradNorms(transformers.TrainerCallback):
    """Records ‖.grad‖ right after each optimizer step (before the Trainer zeroes it)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.stack([g.norm() for g in grads]).norm()))


@pytest.mark.parametrize("name", ["RankOneNewton", "FisherNewton"])
def test_gradient_clipping_scales_the_step(tmp_path, name):
    """max_grad_norm clips the gradient the step uses: the step shrinks by the clipping
    coefficient max_norm / ‖g‖ (the step is linear in g; curvature and direction unchanged)."""
    steps = {}
    norm = {}
    for max_norm in (0.0, 0.05):
        trainer, _ = train(tmp_path, name, max_steps=1, max_grad_norm=max_norm)
        before = params_of(trainer.model)
        record = GradNorms()
        trainer.add_callback(record)
        trainer.train()
        steps[max_norm] = [p - q for p, q in zip(params_of(trainer.model), before)]
        grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        # graph gradients: HF logs the norm before clipping; FisherNewton leaves its g in .grad
        norm[max_norm] = grad_norms[0] if name == "RankOneNewton" else record.norms[0]
    coef = 0.05 / (norm[0.0] + 1e-6)
    assert coef < 0.5  # clipping is active
    if name == "RankOneNewton":
        assert norm[0.0] == pytest.approx(norm[0.05], rel=1e-5)
    else:  # FisherNewton clips the g its step uses and leaves it in .grad, as clip_grad_norm_
        assert norm[0.05] == pytest.approx(coef * norm[0.0], rel=1e-4)
    scale = coef * max(float(d.abs().max()) for d in steps[0.0])
    for full, clipped in zip(steps[0.0], steps[0.05]):
        torch.testing.assert_close(clipped, coef * full, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("name", ["RankOneNewton", "FisherNewton"])
def test_gradient_accumulation_equals_the_large_batch(tmp_path, name):
    """2 micro-batches of 8 accumulated give the step of one batch of 16: graph gradients (and
    their HVPs) add up; FisherNewton sees the per-sample losses of both micro-batches."""
    one, _ = train(tmp_path / "a", name, max_steps=1, per_device_train_batch_size=16)
    two, _ = train(
        tmp_path / "b", name, max_steps=1, per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    # HF (5.x) believes BERT's loss already normalises over the accumulated batch because the
    # model accepts loss kwargs, and sums the micro-batch means; make it divide by the steps
    two.model_accepts_loss_kwargs = False
    one.train()
    two.train()
    for p, q in zip(two.model.parameters(), one.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["RankOneNewton", "FisherNewton"])
def test_lr_scheduler_through_optimizers_tuple(tmp_path, name):
    """optimizers=(opt, scheduler): the Trainer steps the given scheduler once per step."""
    trainer, opt = train(
        tmp_path, name, max_steps=3,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5**step),
    )  # fmt: skip
    lr0 = opt.param_groups[0]["lr"]
    trainer.train()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 / 8)
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert rates == pytest.approx([lr0, lr0 / 2, lr0 / 4])


def test_plain_trainer_has_no_curvature_source(tmp_path):
    """The plain route with transformers.Trainer gives step() nothing to take HVPs from: it
    fails clearly, naming the conventions (hence SecondOrderTrainer)."""
    model = tiny_bert()
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=Sequences(),
        optimizers=(RankOneNewton(model.parameters()), None),
    )
    with pytest.raises(CurvatureError, match="create_graph=True"):
        trainer.train()


def test_bf16_trains(tmp_path):
    data = Sequences()
    trainer, opt = train(tmp_path, "RankOneNewton", bf16=True)
    loss0 = full_loss(trainer.model, data)
    trainer.train()
    assert int(opt.global_state["skipped_steps"]) == 0
    assert full_loss(trainer.model, data) < loss0 - 0.01


def test_refusals(tmp_path):
    """fp16 (loss scaling) and finite-difference HVPs (no closure in Trainer) are refused."""
    args = training_args(tmp_path)
    args.fp16 = True  # set after construction: TrainingArguments may reject fp16 on CPU itself
    model = tiny_bert()
    with pytest.raises(ValueError, match="fp16.*bf16=True"):
        SecondOrderTrainer(model=model, args=args, optimizers=(RankOneNewton(model.parameters()),
                                                               None))  # fmt: skip
    with pytest.raises(ValueError, match="hvp='fd'"):
        SecondOrderTrainer(
            model=model,
            args=training_args(tmp_path),
            optimizers=(NeumannIHVP(model.parameters(), hvp="fd"), None),
        )
