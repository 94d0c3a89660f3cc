"""HuggingFace integration: :class:`SecondOrderTrainer`, a ``transformers.Trainer``.

``Trainer`` calls ``accelerator.backward(loss)`` in ``training_step`` and later
``optimizer.step()`` with no closure, so a plain ``Trainer`` gives our optimizers no curvature
source (their ``step`` raises ``CurvatureError``). ``SecondOrderTrainer`` supplies one:

* ``RankOneNewton`` / ``NeumannIHVP``: ``training_step`` back-propagates with
  ``create_graph=True``; ``step()`` then takes exact HVPs from the gradients' graph.
  HF's gradient clipping scales ``.grad`` in place without recording it in
  the graph, so the step uses the clipped gradient and the unclipped curvature, which is what
  clipping means for a Newton step. Gradient accumulation keeps every micro-batch's graph
  until the step (memory grows with ``gradient_accumulation_steps``).
* ``FisherNewton``: ``training_step`` computes the per-sample losses
  (:meth:`SecondOrderTrainer.compute_per_sample_loss`, override it for other heads) and keeps
  them; the step receives a closure returning those of all accumulated micro-batches, so ``D``
  is the Fisher of the whole accumulated batch. FisherNewton forms its own gradient, so
  ``TrainingArguments.max_grad_norm`` (when > 0) becomes its ``max_grad_norm``: the optimizer
  clips the gradient of the accumulated batch exactly as ``clip_grad_norm_`` would, and with
  it the step (which is linear in the gradient). (HF's logged ``grad_norm`` stays 0: it reads
  ``.grad`` before the step; afterwards ``.grad`` holds the clipped gradient.)

The optimizer and an LR scheduler come in through the standard ``optimizers=(opt, scheduler)``
argument (``scheduler=None``: HF's own, from ``lr_scheduler_type``). fp16 is refused (its
``GradScaler`` multiplies the loss, hence the curvature, by the scale and cannot pass closures);
bf16 needs no scaler and works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    import transformers
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_rankone.integrations.hf needs transformers and accelerate: "
        "pip install torch_rankone[hf]"
    ) from exc

from ..optim import FisherNewton

__all__ = ["SecondOrderTrainer"]


class SecondOrderTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training step gives a torch_rankone optimizer its
    curvature source (see the module docstring); otherwise the usual ``Trainer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.fp16:
            raise ValueError(
                "SecondOrderTrainer does not support fp16: its GradScaler multiplies the loss, "
                "and with it the Hessian-vector products, by the loss scale, and its step cannot "
                "pass a closure. Use bf16=True (no scaler) or full precision."
            )
        super().__init__(*args, **kwargs)
        self._per_sample_losses: list[Tensor] = []
        if self.optimizer is not None:
            self.optimizer = self._wrap(self.optimizer)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """HF's optimizer creation (``optimizer_cls_and_kwargs``), wrapped as for a given one."""
        self.optimizer = self._wrap(super().create_optimizer(model))
        return self.optimizer

    def _wrap(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if getattr(opt, "hvp_mode", None) == "fd":
            raise ValueError(
                "SecondOrderTrainer takes exact HVPs from graph gradients; finite differences "
                "(hvp='fd') need a closure that re-runs the forward pass, which Trainer has not. "
                "Use hvp='auto' or 'exact'."
            )
        if isinstance(opt, FisherNewton):
            return _ClosureStep(opt, self._fisher_closure, lambda: self.args.max_grad_norm)
        return opt

    def _needs_per_sample(self) -> bool:
        opt = self.optimizer
        return isinstance(opt, _ClosureStep) or isinstance(
            getattr(opt, "optimizer", None), _ClosureStep
        )  # accelerate wraps the optimizer once it is prepared

    # ---- the curvature source -------------------------------------------------------------------

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """HF's step with ``create_graph=True`` backward, or (FisherNewton) per-sample losses."""
        if self._needs_per_sample():
            model.train()
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                losses = self.compute_per_sample_loss(model, inputs)
            self._per_sample_losses.append(losses)
            accumulation = getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            return losses.detach().mean() / accumulation  # what HF logs: the mean over the window
        backward = self.accelerator.backward
        # keep the graph on .grad for this step's backward only (an instance attribute shadows
        # the method and is removed again)
        self.accelerator.backward = lambda loss, **kw: backward(loss, create_graph=True, **kw)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del self.accelerator.backward

    def compute_per_sample_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Per-sample losses ``−log p(label | input)`` for FisherNewton, shape ``(B,)``.

        Handles sequence classification (logits ``(B, K)``; ``num_labels == 1``: squared error)
        and token-level heads (logits ``(B, T, K)``, labels ``-100`` ignored, per-sequence mean).
        Override for other heads or label names.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        if logits.dim() == 2 and logits.shape[1] == 1:
            return 0.5 * (logits.squeeze(1) - labels.to(logits.dtype)).pow(2)
        if logits.dim() == 2:
            return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        tokens = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100
        )
        counted = (labels != -100).sum(1).clamp_min(1)
        return tokens.sum(1) / counted

    def _fisher_closure(self) -> Tensor:
        losses, self._per_sample_losses = self._per_sample_losses, []
        if not losses:
            raise RuntimeError("SecondOrderTrainer: optimizer.step() before any training_step")
        return torch.cat(losses)


class _ClosureStep(torch.optim.Optimizer):
    """The Trainer's view of an optimizer that needs a closure: ``step()`` passes the trainer's,
    and hands ``TrainingArguments.max_grad_norm`` (when > 0) to FisherNewton's ``max_grad_norm``.

    Like accelerate's ``AcceleratedOptimizer`` it wraps without ``Optimizer.__init__``: state,
    param groups (which LR schedulers edit) and ``state_dict`` are the wrapped optimizer's.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        closure: Callable[[], Tensor],
        max_grad_norm: Callable[[], float],
    ) -> None:
        self.optimizer = optimizer
        self._closure = closure
        self._max_grad_norm = max_grad_norm

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:
        max_norm = self._max_grad_norm()
        if max_norm is not None and max_norm > 0:
            # the optimizer clips the gradient its step uses, on device (no copy of the
            # parameters, no host sync); max_grad_norm=0 leaves the optimizer's own setting
            self.optimizer.defaults["max_grad_norm"] = float(max_norm)
            for group in self.optimizer.param_groups:
                group["max_grad_norm"] = float(max_norm)
        return self.optimizer.step(closure or self._closure)
