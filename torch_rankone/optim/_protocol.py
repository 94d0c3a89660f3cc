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
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor

from .._random import owned_generator
from .._tensorlist import TensorList, local, locals_, norm, sharded_over, sum_over_shards
from .._validation import check_number
from ._data_parallel import (
    Layout,
    average,
    check_same_params,
    collective_device,
    is_sharded,
    layout_of,
    mean_scalar,
)

HVP_MODES = ("auto", "exact", "fd")

_CONVENTIONS = (
    "Give step() a curvature source: (1) call loss.backward(create_graph=True) before "
    "opt.step(); (2) opt.step(closure) with a closure that returns the loss WITHOUT calling "
    "backward (exact HVPs); or (3) a closure that zeroes the gradients, calls loss.backward() "
    "and returns the loss (the torch.optim.LBFGS / Lightning convention), which uses "
    "finite-difference HVPs (hvp='auto' or 'fd')."
)


_SHARDED = (
    "FSDP2 (fully_shard) gives sharded parameters gradients only through backward(): "
    "autograd.grad and double backward do not reach them. Pass a closure that zeroes the "
    "gradients, calls loss.backward() and returns the loss (finite-difference HVPs, hvp='auto' "
    "or 'fd')."
)


_COMPILED = (
    "the model's backward was compiled by torch.compile, which does not support double "
    "backward (create_graph=True), so exact HVPs are not available. Use finite differences: "
    "hvp='fd' (or 'auto') with a closure that zeroes the gradients, calls loss.backward() and "
    "returns the loss."
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
    no_grad: tuple[bool, ...] = ()  # per parameter: it got no gradient (left alone by the step)


def grad_snapshot(params: Sequence[Tensor]) -> list[tuple[Any, int] | None]:
    """A weak reference to each ``.grad`` and its version counter: one of them changes iff a
    backward wrote it (an ``id`` alone could be reused by a new gradient once the old one is
    freed by ``zero_grad``)."""
    return [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]


def grads_written(params: Sequence[Tensor], before: list[tuple[Any, int] | None]) -> bool:
    for p, snap in zip(params, before):
        if p.grad is None:  # none, or set to None by zero_grad: nothing written
            continue
        if snap is None or snap[0]() is not p.grad or p.grad._version != snap[1]:
            return True
    return False


def _graph_grads(params: Sequence[Tensor]) -> TensorList | None:
    """The ``.grad`` tensors if at least one carries a graph (``create_graph=True``)."""
    if not any(p.grad is not None and p.grad.requires_grad for p in params):
        return None
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def _exact_hvp_fn(grads: Sequence[Tensor], params: Sequence[Tensor]):
    from ..curvature import graph_hvp

    def hvp(v: TensorList) -> TensorList:
        try:
            return graph_hvp(grads, params, v)  # retains the graph by default: one HVP per call
        except RuntimeError as exc:
            _refuse_if_compiled(exc)
            raise

    return hvp


def _refuse_if_compiled(exc: RuntimeError) -> None:
    """A ``CurvatureError`` naming the fix when ``exc`` is torch.compile refusing double backward
    (at gradient time once a compiled backward ran, else at the first HVP)."""
    if "compile" in str(exc):
        raise CurvatureError(_COMPILED) from exc


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
    sharded: bool = False,
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

    ``sharded``: the parameters are FSDP2 ``DTensor`` shards, which receive gradients only from
    ``backward()``: a backward closure is required, and the vectors returned are local pieces.
    """
    params = list(params)
    if sharded and (closure is None or hvp_mode == "exact"):
        raise CurvatureError(_SHARDED)
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
        return Evaluation(None, [g.detach() for g in grads], hvp_fn, "graph", _no_grad(params))

    if hvp_mode == "fd" and need_hvp:
        _refuse_half_fd(params)
    before = grad_snapshot(params)
    rerun = _Rerun(module)
    with torch.enable_grad():
        loss = closure()
    rerun.first_call_done()
    if not isinstance(loss, Tensor):
        raise CurvatureError(f"the closure must return the loss as a tensor, got {type(loss)}")
    backward_ran = grads_written(params, before)
    graph = _graph_grads(params) if backward_ran else None
    if graph is not None and hvp_mode != "fd":  # the closure ran backward(create_graph=True)
        hvp_fn = _exact_hvp_fn(graph, params) if need_hvp else None
        grads = [g.detach() for g in graph]
        return Evaluation(loss.detach(), grads, hvp_fn, "graph", _no_grad(params))
    if backward_ran:
        if any(p.grad is not None and p.grad.layout != torch.strided for p in params):
            raise CurvatureError(
                "sparse gradients (e.g. nn.Embedding(sparse=True)) are not supported: the "
                "curvature solves need dense vectors; use sparse=False"
            )
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
        hvp_fn = _fd_hvp_fn(locals_(params), grad_at_point) if need_hvp else None
        return Evaluation(loss.detach(), grads, hvp_fn, "backward_closure", _no_grad(params))
    if sharded:  # autograd.grad cannot reach FSDP2's sharded parameters (it returns None)
        raise CurvatureError(_SHARDED)
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

        raw = _loss_grads(loss, params, create_graph=False, fill=False)
        hvp_fn = _fd_hvp_fn(params, grad_at_point) if need_hvp else None
        return Evaluation(loss.detach(), _filled(raw, params), hvp_fn, "loss_closure", _none(raw))
    with torch.enable_grad():
        raw = _loss_grads(loss, params, create_graph=need_hvp, fill=False)
    grads = _filled(raw, params)
    hvp_fn = _exact_hvp_fn(grads, params) if need_hvp else None
    grads = [g.detach() for g in grads]
    return Evaluation(loss.detach(), grads, hvp_fn, "loss_closure", _none(raw))


def _grad_copies(params: Sequence[Tensor]) -> TensorList:
    """Copies of (this rank's piece of) the ``.grad`` values (zeros where a parameter got none)."""
    return [
        torch.zeros_like(local(p)) if p.grad is None else local(p.grad).detach().clone()
        for p in params
    ]


def _loss_grads(
    loss: Tensor, params: Sequence[Tensor], *, create_graph: bool, fill: bool = True
) -> list[Tensor | None]:
    """``∇loss`` for every parameter: zeros (``fill``) or ``None`` where the loss does not
    depend on it."""
    try:
        gs = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    except RuntimeError as exc:
        if create_graph:
            _refuse_if_compiled(exc)
        raise
    return _filled(gs, params) if fill else list(gs)


def _filled(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> TensorList:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _none(grads: Sequence[Tensor | None]) -> tuple[bool, ...]:
    return tuple(g is None for g in grads)


def _no_grad(params: Sequence[Tensor]) -> tuple[bool, ...]:
    """Which parameters got no ``.grad`` from the backward pass."""
    return tuple(p.grad is None for p in params)


# ------------------------------------------------------------------------------------------------
# The optimizer base
# ------------------------------------------------------------------------------------------------


class StepInputs(NamedTuple):
    """What :meth:`SecondOrderOptimizer._evaluate_step` hands to an optimizer's update."""

    groups: list[list[Tensor]]  # trainable parameters per param group
    params: list[Tensor]  # all of them, in group order
    call: int  # index of this step() call
    evaluation: Evaluation
    grads: TensorList  # gradient of the union batch (this rank's piece when sharded)
    loss: Tensor | None
    direction_input: TensorList  # the gradient or its momentum average: what is preconditioned
    hvp: Callable[[TensorList], TensorList]  # v ↦ Hv of the union batch


def check_module(module: Any) -> None:
    """``module=`` must be an ``nn.Module`` (or ``None``)."""
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")


def check_update_extras(weight_decay: Any, momentum: Any) -> None:
    """Validate decoupled ``weight_decay`` (≥ 0) and ``momentum`` (in ``[0, 1)``)."""
    check_number("weight_decay", weight_decay)
    check_number("momentum", momentum)
    if momentum >= 1:
        raise ValueError(f"momentum must be < 1 (an exponential average), got {momentum}")


class StepOptions(TypedDict, total=False):
    """Keyword options of the HVP-based optimizers (RankOneNewton, NeumannIHVP; FisherNewton
    takes all but ``grads_synced``, its per-sample gradients being its own): ``generator`` (the
    probes' randomness; default one owned by the optimizer, seeded from ``torch.initial_seed()``),
    ``process_group`` (the data-parallel group; default the world), ``grads_synced`` (whether
    ``.grad`` arrives averaged over ranks; default: True for a DDP-wrapped ``module``) and
    ``module`` (the model, for DDP/FSDP2 and the exact-HVP check)."""

    generator: torch.Generator | None
    process_group: Any
    grads_synced: bool | None
    module: torch.nn.Module | None


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Base class: common state, reproducible directions, data parallelism, masking.

    Optimizer-global state (counters, the last shift, estimated scales, the random generator's
    state) lives in the state of the first parameter, as ``torch.optim.LBFGS`` keeps it, so that
    ``state_dict`` and distributed checkpoints (``torch.distributed.checkpoint``) see only
    per-parameter state; :attr:`global_state` is that dict and :meth:`counters` reads the
    counters. Every state entry is created at construction (zeros, or NaN for a value not yet
    estimated), so the state of a fresh optimizer has the structure a checkpoint needs to be
    loaded into. Counters are device tensors: reading them during training never forces a host
    synchronisation, except at the documented sync points of :meth:`_check_health`.
    """

    #: hyper-parameters a param group may override; the rest must agree across groups
    _per_group: tuple[str, ...] = ("lr",)
    #: GradScaler then hands the step to us (setting ``grad_scale``) instead of unscaling ``.grad``
    #: and stepping behind our back; :meth:`_begin_step` refuses it with a clear message.
    _step_supports_amp_scaling = True
    #: optimizer-global entries besides the counters: name → initial value (float, NaN = unset)
    _global_floats: tuple[str, ...] = ("damping",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        defaults: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        process_group: Any = None,
        grads_synced: bool | None = None,
        module: torch.nn.Module | None = None,
    ) -> None:
        check_module(module)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        if grads_synced not in (None, True, False):
            raise TypeError(f"grads_synced must be None, True or False, got {grads_synced!r}")
        self._owns_generator = generator is None
        if generator is None:
            generator = owned_generator(local(self._first_param()).device)
        self.generator = generator
        self.process_group = process_group
        self.grads_synced = grads_synced
        self.module = module
        self._layout: Layout | None = None  # decided (and checked across ranks) at step 1
        self._seed_synced = False
        self.state = _ParamState(dict, self.state)
        self._init_state()

    # ---- state --------------------------------------------------------------------------------

    def _first_param(self) -> Tensor:
        return next(p for g in self.param_groups for p in g["params"])

    @property
    def global_state(self) -> dict[str, Any]:
        """The optimizer-global state: ``step_calls`` (``step()`` calls, an int), the counters
        (0-d int64 tensors on the parameters' device) and the optimizer's estimates; kept in the
        first parameter's state."""
        return self.state[self._first_param()]

    def counters(self) -> dict[str, int]:
        """``{"step": applied steps, "skipped_steps": ..., <optimizer-specific>: ...}`` as
        Python ints (one host synchronisation; for logging, not the training loop)."""
        state = self.global_state
        return {key: int(state[key]) for key in ("step", *self._health_counters)}

    @property
    def hvp_mode(self) -> str:
        """The curvature source mode (``param_groups[0]["hvp"]``)."""
        return self.param_groups[0].get("hvp", "auto")

    def _param_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Per-parameter buffers (shaped like the parameter) a step of ``group`` keeps."""
        return ("momentum_buffer",) if group.get("momentum", 0.0) else ()

    def _init_state(self) -> None:
        """Create every state entry a step would create, where missing (idempotent)."""
        first = self._first_param()
        state = self.state[first]
        state.setdefault("step_calls", 0)
        for key in ("step", *self._health_counters):
            state.setdefault(key, torch.zeros((), dtype=torch.int64, device=first.device))
        for key in self._global_floats:
            state.setdefault(key, torch.full((), torch.nan, dtype=first.dtype, device=first.device))
        for group in self.param_groups:
            for p in group["params"]:
                self.state.setdefault(p, {})  # every parameter has an entry: checkpoints expect one
            for key in self._param_state_keys(group):
                for p in group["params"]:
                    if key not in self.state[p]:
                        self.state[p][key] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = _ParamState(dict, self.state)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one param group: what every group may set for itself, and the options that
        must agree with the first group (only ``_per_group`` ones may differ). Subclasses add
        their own checks. Run by ``__init__`` and by :meth:`add_param_group`."""
        check_number("param group lr", group["lr"])
        if group.get("hvp", "auto") not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {group['hvp']!r}")
        if "momentum" in group:
            check_update_extras(group["weight_decay"], group["momentum"])
        if any(p.is_complex() for p in group["params"]):
            raise TypeError(
                f"{type(self).__name__} does not support complex parameters (the curvature "
                "models are real symmetric matrices); optimise torch.view_as_real(p) instead"
            )
        first = self.param_groups[0]
        for key in self.defaults:
            if key not in self._per_group and repr(group[key]) != repr(first[key]):
                raise ValueError(
                    f"{type(self).__name__}: '{key}' must be the same for all parameter groups "
                    f"(only {', '.join(self._per_group)} may differ), got {first[key]!r} and "
                    f"{group[key]!r}"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if not hasattr(self, "generator"):  # during __init__, which checks and creates state
            return
        try:
            self._check_group(self.param_groups[-1])
        except (ValueError, TypeError):
            self.param_groups.pop()  # refused: the optimizer is as it was
            raise
        self._init_state()

    def _state_to_param_devices(self) -> None:
        """Move state tensors to their parameter's device (a checkpoint loaded on another
        device, or a model moved after the optimizer was built); a metadata check per step."""
        first = self._first_param()
        if self.global_state["step"].device == local(first).device:
            return
        for p, state in self.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor) and key != "generator_state":
                    state[key] = value.to(p.device)

    def state_dict(self) -> dict[str, Any]:
        self.global_state["generator_state"] = self.generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer: the format of this version, or of version 0.1
        (global state under string keys of ``state``), which is converted. Global entries keep
        their dtype and move to the parameters' device; missing options take the defaults."""
        self._check_state_dict(state_dict)
        state_dict = _migrate_global_state(state_dict)
        first_index = _first_index(state_dict)
        super().load_state_dict(state_dict)
        saved = state_dict["state"].get(first_index, {})
        state, device = self.global_state, self._first_param().device
        for key, value in saved.items():
            if key in ("step_calls", "step", *self._health_counters, *self._global_floats):
                state[key] = value.to(device) if isinstance(value, Tensor) else value
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._init_state()
        self._state_to_param_devices()
        gen_state = state.get("generator_state")
        if gen_state is not None:
            self._restore_generator(gen_state.to("cpu", torch.uint8))
            self._seed_synced = True  # the loaded state is the same on every rank

    #: options added after version 0.1: a checkpoint of that version may lack them
    _options_since_0_2 = frozenset({"hvp", "lambda_max_refresh", "scale_refresh"})
    #: per-parameter entries of version 0.1 that loading converts
    _legacy_entries = frozenset({"sketches"})

    def _check_state_dict(self, state_dict: Any) -> None:
        """Refuse, before anything changes, a state dict that is not this optimizer's: another
        optimizer's options or state entries, other groups, or buffers of other shapes."""
        name = type(self).__name__
        if not (isinstance(state_dict, dict) and {"state", "param_groups"} <= state_dict.keys()):
            raise ValueError(
                f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: the checkpoint has {len(groups)} param groups, this "
                f"optimizer {len(self.param_groups)}"
            )
        ours = set(self.defaults)
        for saved, group in zip(groups, self.param_groups):
            keys = set(saved) - {"params", "param_names"}
            # extra keys are fine (LR schedulers add "initial_lr"); missing options are not
            missing = ours - keys - self._options_since_0_2
            if missing:
                raise ValueError(
                    f"{name}.load_state_dict: not a {name} checkpoint: its param group lacks "
                    f"{sorted(missing)} (it has {sorted(keys)})"
                )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: a param group of the checkpoint has "
                    f"{len(saved['params'])} parameters, this optimizer's {len(group['params'])}"
                )
        state = state_dict["state"]
        params = {
            i: p
            for saved, g in zip(groups, self.param_groups)
            for i, p in zip(saved["params"], g["params"])
        }
        # the checkpoint's options are the ones loaded: they decide which buffers belong
        group_of = {i: {**self.defaults, **saved} for saved in groups for i in saved["params"]}
        optimizer_global = {"step_calls", "generator_state", "step", *self._health_counters}
        optimizer_global |= set(self._global_floats)
        for index, entry in state.items():
            if index not in params:
                continue  # version 0.1's global entries (string keys): converted on load
            buffers = set(self._param_state_keys(group_of[index]))
            unknown = set(entry) - buffers - optimizer_global - self._legacy_entries
            if unknown:
                raise ValueError(
                    f"{name}.load_state_dict: the checkpoint's state has entries {name} does not "
                    f"keep: {sorted(unknown)} (another optimizer's checkpoint?)"
                )
            for key in buffers & set(entry):
                shape = tuple(getattr(entry[key], "shape", ()))
                if shape != tuple(params[index].shape):
                    raise ValueError(
                        f"{name}.load_state_dict: state {key!r} of parameter {index!r} has shape "
                        f"{shape}, the parameter {tuple(params[index].shape)}"
                    )

    def _restore_generator(self, state: Tensor) -> None:
        """Set the generator's state; a checkpoint from another device kind (CPU and CUDA
        generators keep different states) continues on a generator of its own kind."""
        try:
            self.generator.set_state(state)
        except RuntimeError:
            if not self._owns_generator:
                raise
            device = "cpu" if self.generator.device.type != "cpu" else self._first_param().device
            from .._warnings import warn_at_caller

            warn_at_caller(
                f"{type(self).__name__}: the checkpoint's random generator is not a "
                f"{self.generator.device.type} generator's; random directions continue from it "
                f"on the {torch.device(device).type} (bit-identical to the saved run; pass "
                "generator= or start anew to draw on the parameters' device)",
                UserWarning,
            )
            self.generator = torch.Generator(device=device)
            self.generator.set_state(state)

    # ---- parameters -----------------------------------------------------------------------------

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
        self._state_to_param_devices()
        return [[p for p in g["params"] if p.requires_grad] for g in self.param_groups]

    def _next_call(self) -> int:
        """Index of this ``step()`` call, counted on the host (schedules need no device sync);
        saved in ``state_dict`` so that a resumed run keeps the schedule."""
        state = self.global_state
        calls = state["step_calls"]
        state["step_calls"] = calls + 1
        return calls

    def _counter(self, key: str) -> Tensor:
        return self.global_state[key]

    # ---- data parallel ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:
        """One optimizer step (see the class docstring); returns the loss, averaged over the
        ranks when distributed (``None`` for graph gradients)."""
        if self._layout is None:  # the first step decides the layout and checks the ranks
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            if params:
                layout = layout_of(params, self.process_group)
                check_same_params(params, layout, type(self).__name__)
                self._layout = layout
        if self._sharded:
            with sharded_over(self._layout.group):
                return self._step(closure)
        return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Tensor | None:
        raise NotImplementedError

    @property
    def _sharded(self) -> bool:
        return self._layout is not None and self._layout.kind == "shards"

    def _replicas(self) -> bool:
        return self._layout is not None and self._layout.kind == "replicas"

    def _average(self, tensors: TensorList, *, inplace: bool = False) -> TensorList:
        """Mean over the replicas (see :mod:`._data_parallel`); the identity otherwise."""
        if not (self._replicas() and tensors):
            return tensors
        return average(tensors, self._layout.group, inplace=inplace)

    def _mean_loss(self, loss: Tensor | None) -> Tensor | None:
        """The loss averaged over the ranks (replicas or shards): ``step`` returns the global
        mean loss, and the skip decision (which reads it) is the same on every rank."""
        if loss is None or self._layout is None or self._layout.kind == "single":
            return loss
        return mean_scalar(loss, self._layout.group)

    def _synced(self, source: str) -> tuple[bool, bool]:
        """Whether the gradient and the HVPs of ``source`` are already the union batch's."""
        if self._sharded:
            return True, True
        synced = self.grads_synced
        if synced is None:
            synced = isinstance(self.module, torch.nn.parallel.DistributedDataParallel)
        return (
            synced and source in ("graph", "backward_closure"),
            synced and source == "backward_closure",
        )

    def _sync_generator(self, like: Tensor) -> None:
        """Identical random directions on every rank: broadcast the generator's state from the
        group's first rank — the owned generator (seeded per process) and a given one alike (a
        generator seeded per rank would otherwise make the replicas drift apart silently)."""
        if self._seed_synced or self._layout is None or self._layout.kind == "single":
            self._seed_synced = True
            return
        group = self._layout.group
        buf = self.generator.get_state().to(collective_device(group, like))
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(buf, src=src, group=group)
        self.generator.set_state(buf.cpu())
        self._seed_synced = True

    # ---- the update -----------------------------------------------------------------------------

    def _evaluate_step(self, closure: Callable[[], Any] | None) -> StepInputs | None:
        """The common preamble of ``step`` for the HVP-based optimizers: trainable parameters,
        the random generator synchronised, the call counted (and the health checked at a sync
        point), loss/gradient/HVP from the caller's source — averaged over replicas where the
        model did not already —, and the momentum-averaged gradient. ``None`` when there is
        nothing to train."""
        groups = self._begin_step()
        params = [p for ps in groups for p in ps]
        if not params:
            return None
        self._sync_generator(params[0])
        call = self._next_call()
        self._check_health(call)
        ev = evaluate(params, closure, self.hvp_mode, module=self.module, sharded=self._sharded)
        # parameters without a gradient are left alone, as torch.optim does (directions are
        # still drawn for every parameter, so the random stream does not depend on it)
        self._no_grad = {id(p) for p, missing in zip(params, ev.no_grad) if missing}
        grads_synced, hvps_synced = self._synced(ev.source)
        # graph gradients are the caller's tensors: averaged into new ones; copies in place
        g = ev.grads if grads_synced else self._average(ev.grads, inplace=ev.source != "graph")
        loss = self._mean_loss(ev.loss)
        hvp = ev.hvp_fn if hvps_synced else (lambda v: self._average(ev.hvp_fn(v)))
        m = self._momentum_gradient(groups, g)
        return StepInputs(groups, params, call, ev, g, loss, m, hvp)

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
        t = self._counter("step").to(torch.float64) + 1
        out = []
        for ps, gs, group in zip(groups, split_groups(g, groups), self.param_groups):
            beta = group.get("momentum", 0.0)
            if not (beta and ps):
                out += gs
                continue
            bufs = [self._zeros_state(p, "momentum_buffer") for p in ps]
            new = [m.lerp(gi, 1 - beta) for m, gi in zip(bufs, gs)]
            no_grad = getattr(self, "_no_grad", set())
            self._pending_momentum += [
                (m, n) for p, m, n in zip(ps, bufs, new) if id(p) not in no_grad
            ]
            out += torch._foreach_div(new, (1 - beta**t).to(gs[0].dtype))
        return out

    def _apply_masked(
        self, groups: list[list[Tensor]], step: list[TensorList], ok: Tensor
    ) -> Tensor:
        """``p ← p·(1 − lr_g·wd_g) − lr_g · y`` for every group, or nothing at all unless ``ok``
        and every ``lr_g · y`` and decay factor are finite (a huge ``lr`` can overflow a finite
        ``y``; one max-abs pass over the update). ``wd`` is decoupled weight decay (AdamW).
        Returns the flag the step was applied under (commit other state with it).

        ``torch.where`` (not a multiplication by 0, which would keep NaN) keeps a non-finite
        step out of the parameters without a host synchronisation, like GradScaler's found-inf.
        """
        no_grad = getattr(self, "_no_grad", set())
        plans, largest = [], []
        for g_params, y, group in zip(groups, step, self.param_groups):
            if no_grad:  # parameters without a gradient: no step, no decay
                kept = [(p, yp) for p, yp in zip(g_params, y) if id(p) not in no_grad]
                g_params, y = [p for p, _ in kept], [yp for _, yp in kept]
            if not g_params:
                continue
            g_params = locals_(g_params)
            lr = group["lr"]  # a number (or a tensor) multiplies without a copy to the device
            update = torch._foreach_mul(y, lr)
            largest += torch._foreach_norm([u for u in update if u.numel()], math.inf)
            decay, factor = lr * group.get("weight_decay", 0.0), None
            if isinstance(decay, Tensor) or decay:  # 1 − lr·wd, in the parameters' dtype
                dev = update[0].device  # a number is filled in on the device: no host copy
                d = (
                    decay
                    if isinstance(decay, Tensor)
                    else torch.full((), decay, dtype=torch.float64, device=dev)
                )
                factor = (1 - d.to(dev, torch.float64)).to(update[0].dtype)  # inf: masked
                largest.append(factor)
            plans.append((g_params, update, factor))
        if largest:
            finite = torch.isfinite(torch.stack(largest)).all()
            if self._sharded:  # every rank checks its pieces: agree on one flag
                finite = sum_over_shards((~finite).to(torch.float32)) == 0
            ok = ok & finite
        for g_params, update, factor in plans:
            if factor is not None:
                torch._foreach_mul_(g_params, torch.where(ok, factor, 1.0))
            for p, u in zip(g_params, update):
                p.sub_(torch.where(ok, u, 0.0))
        self._count_step(ok)
        return ok

    def _zeros_state(self, p: Tensor, key: str) -> Tensor:
        """This rank's piece of ``self.state[p][key]``, created as zeros shaped like ``p``."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return local(state[key])

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
        state = self.global_state
        for key, (meaning, fix) in self._health_counters.items():
            seen[key] = int(state[key])  # the sync
            new = seen[key] - last.get(key, 0)
            if new > 0 and (key == "skipped_steps" or 2 * new > since):
                from .._warnings import warn_at_caller

                warn_at_caller(
                    f"{type(self).__name__}: {new} of the last {since} step(s) — {meaning} "
                    f"(counters()[{key!r}] = {seen[key]}). Fix: {fix}.",
                    RuntimeWarning,
                )
        self._health_seen = (call, seen)

    def _count_step(self, ok: Tensor) -> None:
        """``step += ok``, ``skipped_steps += not ok`` (on device), and the momentum buffers of
        :meth:`_momentum_gradient` committed where ``ok``."""
        for m, new in getattr(self, "_pending_momentum", ()):
            m.copy_(torch.where(ok, new, m))
        self._pending_momentum = []
        self._counter("step").add_(ok.to(torch.int64))
        self._counter("skipped_steps").add_((~ok).to(torch.int64))

    def _shared_lr(self, groups: list[list[Tensor]]) -> float | Tensor | None:
        """The ``lr`` every non-empty group uses, or ``None`` when they differ (a tensor ``lr``
        counts as shared only if it is the same object: comparing values would sync)."""
        lrs = [group["lr"] for group, ps in zip(self.param_groups, groups) if ps]
        first = lrs[0]
        same = all(lr is first or (not isinstance(lr, Tensor) and lr == first) for lr in lrs)
        return first if len(lrs) == 1 or (same and not isinstance(first, Tensor)) else None

    def _detach_grads(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Leave the plain gradient in ``.grad`` (and drop a ``create_graph`` graph: the
        param ↔ grad reference cycle it creates otherwise leaks memory); ``None`` where the
        parameter got none. A sharded parameter's ``.grad`` (a ``DTensor``) gets this rank's
        piece."""
        no_grad = getattr(self, "_no_grad", set())
        for p, g in zip(params, grads):
            if id(p) in no_grad:
                p.grad = None
            elif not is_sharded(p):
                p.grad = g
            else:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local(p.grad).copy_(g)


class _ParamState(defaultdict):
    """``self.state``: per-parameter entries only. Version 0.1 kept global entries under string
    keys; reading one now raises (instead of silently creating an empty entry) and says where
    they went."""

    def __missing__(self, key: Any) -> Any:
        if isinstance(key, str):
            raise KeyError(
                f"{key!r}: optimizer-global state is kept in the first parameter's state since "
                "version 0.2; read opt.global_state[...] or opt.counters()"
            )
        return super().__missing__(key)


def _first_index(state_dict: dict[str, Any]) -> Any:
    """The key of the first parameter in a packed ``state_dict`` (where global state lives)."""
    return next(i for group in state_dict["param_groups"] for i in group["params"])


def _migrate_global_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Version 0.1 kept global state under string keys of ``state``: move it into the first
    parameter's entry (a new dict; the caller's is not changed)."""
    state = state_dict["state"]
    # keys are parameter indices (state_dict) or names (torch.distributed.checkpoint)
    params = {i for group in state_dict["param_groups"] for i in group["params"]}
    strays = {k: v for k, v in state.items() if k not in params}
    if not strays:
        return state_dict
    first = _first_index(state_dict)
    new_state = {k: v for k, v in state.items() if k in params}
    new_state[first] = {**new_state.get(first, {}), **strays}
    return {**state_dict, "state": new_state}


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
