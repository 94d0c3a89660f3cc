"""Lightning integration: :class:`SecondOrderCallback`.

Under automatic optimization Lightning hands ``optimizer.step`` a closure that runs
``training_step``, ``zero_grad`` and ``backward()`` and returns a *detached* loss. What the
callback adds to that depends on the optimizer ``configure_optimizers`` returned:

* ``RankOneNewton`` / ``NeumannIHVP`` with ``hvp="auto"`` or ``"exact"``: the module's ``backward``
  is made to call ``loss.backward(create_graph=True)``, so the gradients carry their graph and the
  optimizer takes exact Hessian-vector products by double backward;
* the same with ``hvp="fd"``: nothing changes; the optimizer re-runs Lightning's closure at
  shifted parameters for finite-difference HVPs. Each extra call re-runs the
  ``training_step``, the hooks and gradient clipping;
* ``FisherNewton`` (per-sample losses): ``training_step`` returns the **unreduced**
  per-sample losses (``reduction="none"``); the module's ``backward`` keeps them instead of
  back-propagating, and the closure FisherNewton receives returns them.

  ``Trainer(gradient_clip_val=...)`` becomes FisherNewton's ``max_grad_norm``: it clips the
  gradient its step uses exactly as ``clip_grad_norm_`` would (Lightning's own clipping finds
  ``.grad`` empty, since FisherNewton forms the gradient inside ``step``).

It refuses, with a message, what cannot work: fp16 loss scaling (``precision="16-mixed"``:
Lightning then calls ``scaler.step(optimizer)`` without a closure and the gradients are scaled),
FisherNewton with ``accumulate_grad_batches > 1`` (accumulation batches run the closure
outside ``step``, so their per-sample losses would be lost) and FisherNewton with
``gradient_clip_algorithm="value"`` (its step can only be clipped by norm).

After every optimizer step it logs, through the module's logger, ``damping``,
``safeguard_hits``, ``skipped_steps``, ``neumann_fallbacks``, ``scale``, ``lambda_max`` and
``bits_sent`` where the optimizer keeps them in its global state, and ``step_norm`` — the norm
of the parameter change, measured around the step since no optimizer exposes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_rankone.integrations.lightning needs Lightning: pip install torch_rankone[lightning]"
    ) from exc

from ..optim import FisherNewton, SecondOrderOptimizer

__all__ = ["SecondOrderCallback", "DIAGNOSTICS"]


def _global_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Where an optimizer keeps its global state: ``global_state`` (this package's optimizers),
    else the first parameter's state (``torch.optim.LBFGS``'s convention)."""
    state = getattr(opt, "global_state", None)
    if state is not None:
        return state
    first = next((p for g in opt.param_groups for p in g["params"]), None)
    return opt.state.get(first, {})


#: optimizer-state entries logged when present (counters are cumulative)
DIAGNOSTICS = (
    "damping",
    "safeguard_hits",
    "skipped_steps",
    "neumann_fallbacks",
    "scale",
    "lambda_max",
    "bits_sent",
)


class SecondOrderCallback(pl.Callback):
    """Gives a torch_rankone optimizer its curvature source in a ``lightning.Trainer`` and logs
    its diagnostics (see the module docstring for the conventions).

    Args:
        prefix: prefix of the logged metric names (``"second_order/damping"``, ...).
        log_step_norm: measure ``‖x_after − x_before‖`` around each step (one copy of the
            parameters per step) and log it as ``step_norm``.
    """

    def __init__(self, prefix: str = "second_order/", log_step_norm: bool = True) -> None:
        self.prefix = prefix
        self.log_step_norm = log_step_norm
        self._mode: str | None = None  # "graph" | "fd" | "per_sample", fixed at fit start
        self._per_sample: Tensor | None = None
        self._max_grad_norm: float | None = None  # FisherNewton: what its steps clip to
        self._before: list[Tensor] | None = None
        self._steps = 0

    # ---- set-up ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        plugin = trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise RuntimeError(
                "SecondOrderCallback: fp16 loss scaling (precision='16-mixed') is not supported: "
                "Lightning then calls scaler.step(optimizer) without a closure, with gradients "
                "(and any graph on them) multiplied by the loss scale. Use precision='bf16-mixed' "
                "(no scaler), '32-true' or '64-true'."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Choose the curvature source from the optimizer and wire the module accordingly
        (the optimizers exist from here on; they do not in ``setup``)."""
        if not pl_module.automatic_optimization:
            self._mode = "manual"  # the module calls opt.step(closure) itself: only log
            return
        if len(trainer.optimizers) != 1 or not isinstance(
            trainer.optimizers[0], SecondOrderOptimizer
        ):
            names = [type(o).__name__ for o in trainer.optimizers]
            raise TypeError(
                "SecondOrderCallback expects configure_optimizers to return exactly one "
                f"torch_rankone optimizer, got {names}"
            )
        opt = trainer.optimizers[0]
        if isinstance(opt, FisherNewton):
            if trainer.accumulate_grad_batches != 1:
                raise RuntimeError(
                    "SecondOrderCallback: FisherNewton needs accumulate_grad_batches=1 (Lightning "
                    "runs accumulation batches outside optimizer.step, so their per-sample "
                    "losses cannot reach the optimizer); use a larger batch instead."
                )
            self._max_grad_norm = _fisher_max_grad_norm(opt, trainer)
            self._mode = "per_sample"
        else:
            self._mode = "fd" if getattr(opt, "hvp_mode", "auto") == "fd" else "graph"
        if self._mode != "fd":
            # instance attributes shadow the class's hooks for this fit only (undone at the end)
            pl_module.backward = self._wrap_backward(pl_module.backward)
        if self._mode == "per_sample":
            pl_module.optimizer_step = self._wrap_optimizer_step(pl_module.optimizer_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook in ("backward", "optimizer_step"):
            pl_module.__dict__.pop(hook, None)  # back to the class's methods
        self._per_sample = self._before = None

    def _wrap_backward(self, backward: Callable[..., None]) -> Callable[..., None]:
        def graph_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            # keep the graph on .grad: the optimizer differentiates the gradient once more
            backward(loss, *args, create_graph=True, **kwargs)

        def keep_per_sample(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            if loss.dim() != 1:
                raise RuntimeError(
                    "SecondOrderCallback with FisherNewton: training_step must return the 1-D "
                    "tensor of per-sample losses (reduction='none'), got shape "
                    f"{tuple(loss.shape)}"
                )
            self._per_sample = loss  # FisherNewton differentiates the rows itself

        return keep_per_sample if self._mode == "per_sample" else graph_backward

    def _wrap_optimizer_step(self, optimizer_step: Callable[..., None]) -> Callable[..., None]:
        def step_with_per_sample_losses(epoch, batch_idx, optimizer, optimizer_closure=None):
            # set at every step: a resumed checkpoint restores the param groups after fit start
            _set_max_grad_norm(optimizer, self._max_grad_norm)

            def closure() -> Tensor:
                optimizer_closure()  # training_step, hooks, and the backward kept the losses
                losses, self._per_sample = self._per_sample, None
                return losses

            optimizer_step(epoch, batch_idx, optimizer, closure)

        return step_with_per_sample_losses

    # ---- diagnostics -----------------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._steps = trainer.global_step
        if self.log_step_norm:
            self._before = [p.detach().clone() for p in _params(trainer.optimizers[0])]

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx) -> None:
        if trainer.global_step == self._steps:
            return  # an accumulation batch: no optimizer step to report
        opt = trainer.optimizers[0]
        state = _global_state(opt)
        metrics = {
            self.prefix + key: state[key].detach().float()
            for key in DIAGNOSTICS
            if isinstance(state.get(key), Tensor)
        }
        if self._before is not None:
            diffs = torch._foreach_sub([p.detach() for p in _params(opt)], self._before)
            metrics[self.prefix + "step_norm"] = torch.linalg.vector_norm(
                torch.stack(torch._foreach_norm(diffs))
            ).float()
            self._before = None
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)


def _fisher_max_grad_norm(opt: FisherNewton, trainer: pl.Trainer) -> float | None:
    """The ``max_grad_norm`` FisherNewton's steps use under this Trainer: its
    ``gradient_clip_val`` if set, else the optimizer's own.

    FisherNewton forms its gradient inside ``step`` (``.grad`` is empty when Lightning clips), so
    Lightning's own clipping has nothing to act on; the optimizer clips the gradient its step
    uses instead, exactly as ``clip_grad_norm_`` would (and the step with it: it is linear in the
    gradient). Clipping by value has no such equivalent and is refused, and so is a
    ``max_grad_norm`` given to the optimizer that disagrees with the Trainer's.
    """
    own = opt.param_groups[0].get("max_grad_norm")
    clip = trainer.gradient_clip_val
    if not clip:
        return own
    algorithm = trainer.gradient_clip_algorithm
    if algorithm is not None and str(getattr(algorithm, "value", algorithm)).lower() != "norm":
        raise RuntimeError(
            "SecondOrderCallback: FisherNewton supports gradient_clip_algorithm='norm' only: it "
            "forms its gradient inside step() and clips it by norm (max_grad_norm), which "
            "scales its step exactly; clipping by value would change the direction in a way the "
            "step cannot reproduce. Use gradient_clip_algorithm='norm'."
        )
    if own is not None and own != clip:
        raise RuntimeError(
            f"SecondOrderCallback: FisherNewton(max_grad_norm={own}) and "
            f"Trainer(gradient_clip_val={clip}) disagree; set only one of them."
        )
    return float(clip)


def _set_max_grad_norm(optimizer: Any, max_norm: float | None) -> None:
    opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps it
    opt.defaults["max_grad_norm"] = max_norm
    for group in opt.param_groups:
        group["max_grad_norm"] = max_norm


def _params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
