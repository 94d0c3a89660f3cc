"""The protocol every optimizer of the package shares.

* :func:`evaluate` turns what the user gave ``step`` into a gradient and an HVP function, from
  one of three sources:

  1. *graph gradients* — every ``p.grad`` carries a graph (``loss.backward(create_graph=True)``,
     the AdaHessian convention): exact HVP by double backward;
  2. *loss closure* — the closure returns the loss without calling ``backward``: the optimizer
     differentiates it with ``create_graph=True``: exact HVP;
  3. *backward closure* — the closure zeroes gradients, calls ``backward()`` and returns the
     loss (``torch.optim.LBFGS`` and Lightning's convention): HVP by central finite
     differences of gradients, ``Hu ≈ (∇f(x+εu) − ∇f(x−εu)) / 2ε`` (two more closure calls),
     with the parameters restored bit-for-bit afterwards.

* :class:`SecondOrderOptimizer` — the common ``torch.optim.Optimizer`` base: the owned random
  generator (saved in ``state_dict``), the step/skip counters, data-parallel averaging and the
  on-device masking of non-finite updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._tensorlist import TensorList, norm

HVP_MODES = ("auto", "exact", "fd")

_CONVENTIONS = (
    "Give step() a curvature source: (1) call loss.backward(create_graph=True) before "
    "opt.step(); (2) opt.step(closure) with a closure that returns the loss WITHOUT calling "
    "backward (exact HVPs); or (3) a closure that zeroes the gradients, calls loss.backward() "
    "and returns the loss (the torch.optim.LBFGS / Lightning convention), which uses "
    "finite-difference HVPs (hvp='auto' or 'fd')."
)


class CurvatureError(RuntimeError):
    """No usable gradient/curvature source was given to ``step``."""


class Evaluation(NamedTuple):
    """What ``step`` works with: the loss (detached, or ``None``), the plain gradient, and
    ``v ↦ H v`` (``None`` when not requested)."""

    loss: Tensor | None
    grads: TensorList
    hvp_fn: Callable[[TensorList], TensorList] | None
    source: str  # "graph" | "loss_closure" | "backward_closure"


def _grad_snapshot(params: Sequence[Tensor]) -> list[tuple[int, int] | None]:
    """Identity and version counter of each ``.grad`` — they change iff a backward wrote it."""
    return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def _graph_grads(params: Sequence[Tensor]) -> TensorList | None:
    """The ``.grad`` tensors if at least one carries a graph (``create_graph=True``)."""
    if not any(p.grad is not None and p.grad.requires_grad for p in params):
        return None
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def _exact_hvp_fn(grads: Sequence[Tensor], params: Sequence[Tensor]):
    from ..curvature import graph_hvp

    return lambda v: graph_hvp(grads, params, v, retain_graph=True)


def fd_epsilon(params: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """Central-difference step ``ε = eps^{1/3} · max(1, ‖x‖) / ‖v‖`` (0-d tensor, on device).

    ``eps^{1/3}`` balances the ``O(ε²)`` truncation error against the ``O(eps/ε)`` rounding of
    the gradient difference; scaling by ``‖x‖`` makes the perturbation relative to the
    parameters, as a difference quotient must be to resolve anything in floating point.
    """
    cube_root_eps = torch.finfo(params[0].dtype).eps ** (1 / 3)
    return cube_root_eps * norm(params).clamp_min(1.0) / norm(v).clamp_min(1e-300)


def _fd_hvp_fn(
    params: Sequence[Tensor], grad_at_point: Callable[[], TensorList]
) -> Callable[[TensorList], TensorList]:
    """``v ↦ (∇f(x+εv) − ∇f(x−εv)) / 2ε`` with ``x`` restored exactly after each product."""

    def hvp(v: TensorList) -> TensorList:
        eps = fd_epsilon(params, v)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            step = torch._foreach_mul(v, eps)
            try:
                torch._foreach_add_(params, step)
                g_plus = grad_at_point()
                torch._foreach_copy_(params, saved)
                torch._foreach_sub_(params, step)
                g_minus = grad_at_point()
            finally:
                torch._foreach_copy_(params, saved)  # bit-for-bit, whatever happened
            return torch._foreach_div(torch._foreach_sub(g_plus, g_minus), 2 * eps)

    return hvp


class _Rerun:
    """Re-runs a closure for finite differences as if it ran once per step.

    Every re-run starts from the random state the first call started from (the same dropout
    masks: the difference quotient must differentiate one function). Afterwards the random state
    is put back to what it was just before the re-run, so the global stream advances as if the
    closure ran once per step (and numbers drawn between products are not replayed); with
    ``module``, the module's buffers (BatchNorm running statistics) are put back to what the
    first call left, so they advance once per step too.
    """

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.module = module
        self.before = self._rng()

    @staticmethod
    def _rng() -> tuple[Tensor, list[Tensor]]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set_rng(state: tuple[Tensor, list[Tensor]]) -> None:
        torch.set_rng_state(state[0])
        if state[1]:
            torch.cuda.set_rng_state_all(state[1])

    def first_call_done(self) -> None:
        buffers = [] if self.module is None else list(self.module.buffers())
        self.buffers = [(b, b.detach().clone()) for b in buffers]

    def __call__(self, fn: Callable[[], Any]) -> Any:
        current = self._rng()
        self._set_rng(self.before)
        try:
            return fn()
        finally:
            self._set_rng(current)
            with torch.no_grad():
                for b, saved in self.buffers:
                    b.copy_(saved)


def _refuse_half_fd(params: Sequence[Tensor]) -> None:
    half = {p.dtype for p in params} & {torch.float16, torch.bfloat16}
    if half:
        raise CurvatureError(
            "finite-difference HVPs need float32 or float64 parameters, got "
            f"{sorted(map(str, half))}: the step eps^(1/3) is 0.1-0.2 in half precision, so "
            "the difference quotient means nothing. Train in float32 (bfloat16 autocast is "
            "fine) or give an exact curvature source (loss.backward(create_graph=True), or a "
            "closure that returns the loss without calling backward)."
        )


def evaluate(
    params: Sequence[Tensor],
    closure: Callable[[], Any] | None,
    hvp_mode: str,
    *,
    need_hvp: bool = True,
    module: torch.nn.Module | None = None,
) -> Evaluation:
    """Obtain loss, gradient and HVP function from the source the caller provided.

    ``hvp_mode="auto"`` picks graph gradients, else a loss closure, else a backward closure;
    ``"exact"`` refuses the backward closure; ``"fd"`` uses finite differences of gradients
    whatever the closure does (it needs a closure to re-evaluate gradients).

    Finite differences re-run the closure: every re-run sees the random state of the first call
    (identical dropout masks), the random state advances as if the closure ran once, and with
    ``module`` its buffers (BatchNorm running statistics) are restored after each re-run, so they
    advance once per step — without ``module`` they advance on every closure call. Other side
    effects of the closure (logging, Lightning's gradient clipping) happen on every call.
    Half-precision parameters are refused for finite differences.
    """
    params = list(params)
    if closure is None:
        grads = _graph_grads(params)
        if grads is None:
            raise CurvatureError(
                "step() got no closure and the gradients carry no graph. " + _CONVENTIONS
            )
        if hvp_mode == "fd":
            raise CurvatureError(
                "hvp='fd' re-evaluates gradients at shifted parameters and needs a closure. "
                + _CONVENTIONS
            )
        hvp_fn = _exact_hvp_fn(grads, params) if need_hvp else None
        return Evaluation(None, [g.detach() for g in grads], hvp_fn, "graph")

    if hvp_mode == "fd" and need_hvp:
        _refuse_half_fd(params)
    before = _grad_snapshot(params)
    rerun = _Rerun(module)
    with torch.enable_grad():
        loss = closure()
    rerun.first_call_done()
    if not isinstance(loss, Tensor):
        raise CurvatureError(f"the closure must return the loss as a tensor, got {type(loss)}")
    backward_ran = _grad_snapshot(params) != before
    graph = _graph_grads(params) if backward_ran else None
    if graph is not None and hvp_mode != "fd":  # the closure ran backward(create_graph=True)
        hvp_fn = _exact_hvp_fn(graph, params) if need_hvp else None
        return Evaluation(loss.detach(), [g.detach() for g in graph], hvp_fn, "graph")
    if backward_ran:
        if hvp_mode == "exact":
            raise CurvatureError(
                "hvp='exact' cannot use a closure that calls backward() itself (gradients "
                "without a graph). Return the loss without calling backward, or call "
                "loss.backward(create_graph=True) in it, or use hvp='fd'. " + _CONVENTIONS
            )

        if need_hvp:
            _refuse_half_fd(params)

        def grad_at_point() -> TensorList:
            with torch.enable_grad():
                rerun(closure)
            return _grad_copies(params)

        grads = _grad_copies(params)
        hvp_fn = _fd_hvp_fn(params, grad_at_point) if need_hvp else None
        return Evaluation(loss.detach(), grads, hvp_fn, "backward_closure")
    if not loss.requires_grad:
        raise CurvatureError(
            "the closure returned a loss without a graph and did not call backward(). "
            + _CONVENTIONS
        )
    if loss.dim() != 0:
        raise CurvatureError(
            f"the closure must return a scalar loss, got shape {tuple(loss.shape)}"
        )
    if hvp_mode == "fd":

        def grad_at_point() -> TensorList:
            # differentiate inside the re-run: restoring the buffers in place first would
            # invalidate the graph (BatchNorm's backward saves its running statistics)
            with torch.enable_grad():
                return rerun(lambda: _loss_grads(closure(), params, create_graph=False))

        grads = _loss_grads(loss, params, create_graph=False)
        hvp_fn = _fd_hvp_fn(params, grad_at_point) if need_hvp else None
        return Evaluation(loss.detach(), grads, hvp_fn, "loss_closure")
    with torch.enable_grad():
        grads = _loss_grads(loss, params, create_graph=need_hvp)
    hvp_fn = _exact_hvp_fn(grads, params) if need_hvp else None
    return Evaluation(loss.detach(), [g.detach() for g in grads], hvp_fn, "loss_closure")


def _grad_copies(params: Sequence[Tensor]) -> TensorList:
    """Copies of the ``.grad`` values (zeros where a parameter got none)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


def _loss_grads(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool) -> TensorList:
    gs = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


# ------------------------------------------------------------------------------------------------
# The optimizer base
# ------------------------------------------------------------------------------------------------


def check_hyper(name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite number ≥ (>) ``low``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")


class StepInputs(NamedTuple):
    """What :meth:`SecondOrderOptimizer._evaluate_step` hands to an optimizer's update."""

    groups: list[list[Tensor]]  # trainable parameters per param group
    params: list[Tensor]  # all of them, in group order
    call: int  # index of this step() call
    evaluation: Evaluation
    grads: TensorList  # gradient, averaged over ranks
    loss: Tensor | None
    direction_input: TensorList  # the gradient or its momentum average: what is preconditioned


def check_module(module: Any) -> None:
    """``module=`` must be an ``nn.Module`` (or ``None``)."""
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")


def check_update_extras(weight_decay: Any, momentum: Any) -> None:
    """Validate decoupled ``weight_decay`` (≥ 0) and ``momentum`` (in ``[0, 1)``)."""
    check_hyper("weight_decay", weight_decay)
    check_hyper("momentum", momentum)
    if momentum >= 1:
        raise ValueError(f"momentum must be < 1 (an exponential average), got {momentum}")


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Base class: common state, reproducible directions, averaging, masking.

    Global (not per-parameter) state lives under string keys of ``self.state`` — ``"step"``
    (applied steps), ``"skipped_steps"`` (non-finite steps masked), optimizer-specific counters —
    as device tensors, so reading them never forces a host sync during training. The random
    generator's state is saved as ``state["generator_state"]`` by :meth:`state_dict`.
    """

    #: hyper-parameters a param group may override; the rest must agree across groups
    _per_group: tuple[str, ...] = ("lr",)
    #: GradScaler then hands the step to us (setting ``grad_scale``) instead of unscaling ``.grad``
    #: and stepping behind our back; :meth:`_begin_step` refuses it with a clear message.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        defaults: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(params, defaults)
        for group in self.param_groups:  # what every group may set for itself
            check_hyper("param group lr", group["lr"])
            if "momentum" in group:
                check_update_extras(group["weight_decay"], group["momentum"])
        for key in defaults:
            if key in self._per_group:
                continue
            values = {repr(g[key]) for g in self.param_groups}
            if len(values) > 1:
                raise ValueError(
                    f"{type(self).__name__}: '{key}' must be the same for all parameter groups "
                    f"(only {', '.join(self._per_group)} may differ), got {sorted(values)}"
                )
        self._owns_generator = generator is None
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(torch.initial_seed())
        self.generator = generator
        self.process_group = process_group
        self._seed_synced = False

    # ---- parameters and global state ---------------------------------------------------------

    def _begin_step(self) -> list[list[Tensor]]:
        """The trainable parameters per group, after refusing a loss scaler."""
        if (
            getattr(self, "grad_scale", None) is not None
            or getattr(self, "found_inf", None) is not None
        ):
            raise RuntimeError(
                f"{type(self).__name__} cannot be stepped by a GradScaler (float16 mixed "
                "precision): the scaler passes no closure, and its scale would multiply the "
                "curvature (HVPs, per-sample gradients) while only .grad is unscaled, so the "
                "step would be silently wrong. Use bfloat16 autocast (no scaler) or float32."
            )
        return [[p for p in g["params"] if p.requires_grad] for g in self.param_groups]

    def _next_call(self) -> int:
        """Index of this ``step()`` call, counted on the host (schedules need no device sync);
        saved in ``state_dict`` so that a resumed run keeps the schedule."""
        calls = self.state.get("step_calls", 0)
        self.state["step_calls"] = calls + 1
        return calls

    def _counter(self, key: str, like: Tensor) -> Tensor:
        if key not in self.state:
            self.state[key] = torch.zeros((), dtype=torch.int64, device=like.device)
        return self.state[key]

    def state_dict(self) -> dict[str, Any]:
        self.state["generator_state"] = self.generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        gen_state = self.state.get("generator_state")
        if gen_state is not None:
            self.generator.set_state(
                gen_state.cpu() if gen_state.device.type != "cpu" else gen_state
            )
            self._seed_synced = True  # the loaded state is the same on every rank

    # ---- data parallel ------------------------------------------------------------------------

    def _distributed(self) -> bool:
        return self.process_group is not None or (dist.is_available() and dist.is_initialized())

    def _average(self, tensors: TensorList) -> TensorList:
        """Mean over ranks as new tensors (the inputs, which may belong to an autograd graph,
        are not modified); the identity single-process. Averaging values that DDP already
        averaged changes nothing, so this is also right for a DDP-wrapped model."""
        if not (self._distributed() and tensors):
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.process_group)
        flat /= dist.get_world_size(self.process_group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def _average_with_loss(
        self, grads: TensorList, loss: Tensor | None
    ) -> tuple[TensorList, Tensor | None]:
        """Gradient and loss averaged in the same all_reduce: ``step`` returns the global mean
        loss, and the skip decision (which reads the loss) is the same on every rank even when
        only one rank's loss is non-finite."""
        if loss is None or not self._distributed():
            return self._average(grads), loss
        *g, mean = self._average([*grads, loss.detach().to(grads[0].dtype).reshape(())])
        return g, mean.to(loss.dtype)

    def _sync_generator(self) -> None:
        """Identical random directions on every rank: broadcast the generator's state from the
        group's first rank — the owned generator (seeded per process) and a given one alike (a
        generator seeded per rank would otherwise make the replicas drift apart silently)."""
        if self._seed_synced or not self._distributed():
            return
        state = self.generator.get_state()
        backend_device = "cuda" if dist.get_backend(self.process_group) == "nccl" else "cpu"
        buf = state.to(backend_device)
        src = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        dist.broadcast(buf, src=src, group=self.process_group)
        self.generator.set_state(buf.cpu())
        self._seed_synced = True

    # ---- the update -----------------------------------------------------------------------------

    def _evaluate_step(self, closure: Callable[[], Any] | None) -> StepInputs | None:
        """The common preamble of ``step`` for the HVP-based optimizers: trainable parameters,
        the random generator synchronised, the call counted (and the health checked at a sync
        point), loss/gradient/HVP from the caller's source, averaged over ranks, and the
        momentum-averaged gradient. ``None`` when there is nothing to train."""
        groups = self._begin_step()
        params = [p for ps in groups for p in ps]
        if not params:
            return None
        self._sync_generator()
        call = self._next_call()
        self._check_health(call)
        ev = evaluate(params, closure, self.hvp_mode, module=self.module)
        g, loss = self._average_with_loss(ev.grads, ev.loss)
        m = self._momentum_gradient(groups, g)
        return StepInputs(groups, params, call, ev, g, loss, m)

    def _momentum_gradient(self, groups: list[list[Tensor]], g: TensorList) -> TensorList:
        """``m̂_t = m_t/(1 − β^t)``, ``m_t = β m_{t−1} + (1 − β) g_t`` per group with
        ``momentum = β > 0`` (Adam's first moment: ``lr`` keeps its meaning), else ``g``.

        The preconditioner is applied to ``m̂`` (as AdaHessian does). The buffers are committed by
        :meth:`_count_step` only where the step is applied, so a skipped step changes nothing.
        """
        self._pending_momentum = []
        if not any(group.get("momentum", 0.0) for group in self.param_groups):
            return g
        # t counts this step, on device, in float64 (β^t of an int64 tensor would be float32)
        t = self._counter("step", g[0]).to(torch.float64) + 1
        out = []
        for ps, gs, group in zip(groups, split_groups(g, groups), self.param_groups):
            beta = group.get("momentum", 0.0)
            if not (beta and ps):
                out += gs
                continue
            bufs = [self._zeros_state(p, "momentum_buffer") for p in ps]
            new = [m.lerp(gi, 1 - beta) for m, gi in zip(bufs, gs)]
            self._pending_momentum += zip(bufs, new)
            out += torch._foreach_div(new, (1 - beta**t).to(gs[0].dtype))
        return out

    def _apply_masked(self, groups: list[list[Tensor]], step: list[TensorList], ok: Tensor) -> None:
        """``p ← p·(1 − lr_g·wd_g) − lr_g · y`` for every group, or nothing at all where ``ok``
        is False. ``wd`` is decoupled weight decay (AdamW).

        ``torch.where`` (not a multiplication by 0, which would keep NaN) keeps a non-finite
        step out of the parameters without a host synchronisation, like GradScaler's found-inf.
        """
        for g_params, y, group in zip(groups, step, self.param_groups):
            if not g_params:
                continue
            lr = torch.as_tensor(group["lr"], dtype=g_params[0].dtype, device=g_params[0].device)
            decay = group.get("weight_decay", 0.0)
            if decay:
                torch._foreach_mul_(g_params, torch.where(ok, 1 - lr * decay, 1.0))
            for p, yp in zip(g_params, y):
                p.sub_(torch.where(ok, yp * lr, 0.0))
        self._count_step(ok, groups_first(groups))

    def _zeros_state(self, p: Tensor, key: str) -> Tensor:
        """``self.state[p][key]``, created as zeros shaped like ``p`` on first use."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[key]

    def _uses_weight_decay(self, groups: list[list[Tensor]]) -> bool:
        """Whether any non-empty group uses weight decay (the fused kernel does not)."""
        return any(
            group.get("weight_decay", 0.0) for group, ps in zip(self.param_groups, groups) if ps
        )

    # ---- run-time health: counters checked at a few documented sync points -------------------

    #: counter → (what it means, how to fix it); checked by :meth:`_check_health`
    _health_counters: dict[str, tuple[str, str]] = {
        "skipped_steps": (
            "non-finite loss, gradient or curvature: the step was skipped",
            "lower lr, check the data and loss for inf/NaN, or use float32/float64",
        ),
    }
    #: calls between health checks once the power-of-two schedule (calls 1, 2, 4, …) has passed
    health_check_every: int = 100

    def _is_sync_point(self, call: int) -> bool:
        """Calls at which :meth:`_check_health` reads the counters (one host sync each):
        1, 2, 4, 8, … up to ``health_check_every``, then every ``health_check_every`` calls."""
        every = self.health_check_every
        return call > 0 and ((call & (call - 1) == 0 and call < every) or call % every == 0)

    def _check_health(self, call: int) -> None:
        """At a sync point, warn (at the user's line of code) when, since the previous check,
        any step was skipped or most steps fell back / had a safeguard fire."""
        if not self._is_sync_point(call):
            return
        last_call, last = getattr(self, "_health_seen", (0, {}))
        since = call - last_call
        seen = {}
        for key, (meaning, fix) in self._health_counters.items():
            if key not in self.state:
                continue
            seen[key] = int(self.state[key])  # the sync
            new = seen[key] - last.get(key, 0)
            if new > 0 and (key == "skipped_steps" or 2 * new > since):
                from .._warnings import warn_at_caller

                warn_at_caller(
                    f"{type(self).__name__}: {new} of the last {since} step(s) — {meaning} "
                    f"(state[{key!r}] = {seen[key]}). Fix: {fix}.",
                    RuntimeWarning,
                )
        self._health_seen = (call, seen)

    def _count_step(self, ok: Tensor, like: Tensor) -> None:
        """``state["step"] += ok``, ``state["skipped_steps"] += not ok`` (on device), and the
        momentum buffers of :meth:`_momentum_gradient` committed where ``ok``."""
        for m, new in getattr(self, "_pending_momentum", ()):
            m.copy_(torch.where(ok, new, m))
        self._pending_momentum = []
        self._counter("step", like).add_(ok.to(torch.int64))
        self._counter("skipped_steps", like).add_((~ok).to(torch.int64))

    def _shared_lr(self, groups: list[list[Tensor]]) -> float | Tensor | None:
        """The ``lr`` every non-empty group uses, or ``None`` when they differ (a tensor ``lr``
        counts as shared only if it is the same object: comparing values would sync)."""
        lrs = [group["lr"] for group, ps in zip(self.param_groups, groups) if ps]
        first = lrs[0]
        same = all(lr is first or (not isinstance(lr, Tensor) and lr == first) for lr in lrs)
        return first if len(lrs) == 1 or (same and not isinstance(first, Tensor)) else None

    @staticmethod
    def _detach_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Leave the plain gradient in ``.grad`` (and drop a ``create_graph`` graph: the
        param ↔ grad reference cycle it creates otherwise leaks memory)."""
        for p, g in zip(params, grads):
            p.grad = g


def groups_first(groups: list[list[Tensor]]) -> Tensor:
    return next(p for ps in groups for p in ps)


def all_finite(*values: Tensor | None) -> Tensor:
    """0-d bool tensor: every given scalar is finite (``None`` entries are ignored)."""
    flags = [torch.isfinite(v).all() for v in values if v is not None]
    return torch.stack(flags).all()


def split_groups(flat: Sequence[Tensor], groups: list[list[Tensor]]) -> list[TensorList]:
    """Cut a list over all parameters into per-group lists (same order as ``groups``)."""
    out, i = [], 0
    for ps in groups:
        out.append(list(flat[i : i + len(ps)]))
        i += len(ps)
    return out
