"""Peer benchmark: this package's optimizers next to the ones users would pick instead.

Run (opt-in; needs the ``bench`` extra)::

    python -m benchmarks.peers                      # full: every optimizer, workload, 3 seeds
    python -m benchmarks.peers --quick              # smoke run: a few steps, 1 seed, no grid,
                                                    # written to a temporary folder
    python -m benchmarks.peers --workloads mlp bert --optimizers Adam RankOneNewton --seeds 1

Writes ``peers.csv`` (one row per run), ``peers_curves.json`` (the training-loss curves),
``peers.md`` (one table per workload) to ``--out`` (default ``docs/results``) and the figure
``peers.png`` to ``--figure`` (default ``docs/figures/peers.png``).

**Optimizers** (:data:`OPTIMIZERS`): ``torch.optim`` Adam, AdamW, SGD (momentum 0.9) and LBFGS,
pytorch_optimizer's AdaHessian and SophiaH, and the package's RankOneNewton, NeumannIHVP and
FisherNewton. Each is built from its constructor's defaults — parameters only (plus
``momentum=0.9`` for SGD, ``module=model`` for FisherNewton) — and, for the grid, with one
hyper-parameter changed relative to the default value read from the built optimizer:

* Adam, AdamW, AdaHessian, SophiaH: ``lr`` ×1/3, ×3;
* SGD: ``lr`` ×10, ×30, ×100, ×300 (torch's default ``lr=1e-3`` is a placeholder nobody
  trains with);
* LBFGS: ``lr`` ×1/3, and ``line_search_fn="strong_wolfe"``;
* the package's optimizers: ``lr`` ×1/3, ×3 and ``damping`` ×0.3, ×3.

The report shows each optimizer from its defaults and at its best grid setting (lowest mean
final training loss over the seeds; a setting with a diverged seed is never best). Adding an
optimizer, or a variant of one, is one :class:`OptimizerSpec` in :data:`OPTIMIZERS`, e.g.
``OptimizerSpec("RankOneNewton-iso", lambda p, model, **kw: RankOneNewton(p,
preconditioner="isotropic", **kw), "create_graph", OURS_GRID, ours=True)``.

**Stepping conventions** (``OptimizerSpec.convention``): ``"backward"`` — ``loss.backward();
opt.step()``; ``"create_graph"`` — ``loss.backward(create_graph=True); opt.step()``
(AdaHessian, SophiaH, RankOneNewton, NeumannIHVP; the gradients are set to ``None`` after the
step, dropping the graph); ``"closure"`` — ``opt.step(closure)`` with a closure that zeroes the
gradients, calls ``backward()`` and returns the loss (LBFGS); ``"per_sample"`` —
``opt.step(closure)`` with a closure returning the per-sample losses (``reduction="none"``,
FisherNewton).

**Budget.** Each workload (:mod:`benchmarks.workloads`) fixes a number of iterations: one
mini-batch each, and for LBFGS one closure evaluation each (``LBFGS.step`` evaluates up to 25
times on its mini-batch; the next call gets the next mini-batch; the last call may overshoot
the budget by its evaluations).

**Metrics** per (workload, optimizer, setting, seed): the final training loss (the whole
training set, eval mode), the test accuracy (balanced accuracy on w8a), the median time of a step
(LBFGS: of a closure evaluation; the step's time divided by its evaluations), the training-loss
curve (about 20 points) against iterations, gradient evaluations, HVPs and training wall-clock
(evaluations excluded), the time and iterations to the workload's target loss, and the counters
the optimizer keeps in its state (``skipped_steps``, ``neumann_fallbacks``, ``safeguard_hits``,
…) plus the number of ``RuntimeWarning`` health reports it issued.

*Gradient evaluations* are the model's forward passes in training mode (each is followed by one
backward; FisherNewton's batched per-sample backward counts as one; finite-difference HVPs,
which re-run a closure, count as gradient evaluations). *HVPs* are double-backward calls:
``torch.autograd.grad`` is wrapped during training and a call counts when its outputs are
gradients (tensors shaped like the inputs, with ``grad_outputs`` given, not batched) — one for
each Hutchinson probe of AdaHessian/SophiaH (SophiaH every 10th step), each of RankOneNewton's
probes (``init_probes`` at the first step, then one), ``num_terms`` per NeumannIHVP step plus
its power iterations.

A non-finite training loss stops the run, which is recorded as ``diverged``; an exception in a
step is recorded as ``error`` with its message. Neither stops the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .workloads import WORKLOADS, Problem, Workload, accuracy, balanced_accuracy, batches

__all__ = ["OPTIMIZERS", "OURS_GRID", "OptimizerSpec", "Setting", "main", "run", "run_one"]

CURVE_POINTS = 20


# ---- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A grid point: ``label`` and ``overrides(defaults) -> kwargs`` (computed from the default
    hyper-parameters read off the optimizer built with no arguments)."""

    label: str
    overrides: Callable[[dict[str, Any]], dict[str, Any]]


def scaled(key: str, factor: float) -> Setting:
    """``key`` set to ``factor`` times its default value."""
    label = f"{key}×{factor:g}" if factor >= 1 else f"{key}×1/{1 / factor:g}"
    if factor < 1 and not math.isclose(1 / factor, round(1 / factor)):
        label = f"{key}×{factor:g}"
    return Setting(label, lambda d: {key: d[key] * factor})


def fixed(key: str, value: Any) -> Setting:
    """``key`` set to ``value``."""
    return Setting(f"{key}={value}", lambda d: {key: value})


DEFAULTS = Setting("defaults", lambda d: {})
LR_GRID = (scaled("lr", 1 / 3), scaled("lr", 3))
OURS_GRID = (*LR_GRID, scaled("damping", 0.3), scaled("damping", 3))


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and step one optimizer.

    ``make(params, model, **overrides)`` builds it (``model`` for those that want
    ``module=``); ``convention`` is ``"backward"``, ``"create_graph"``, ``"closure"`` or
    ``"per_sample"`` (see the module docstring); ``grid`` the settings tried besides the
    defaults; ``requires`` a module that must be importable (else the optimizer is skipped).
    """

    name: str
    make: Callable[..., torch.optim.Optimizer]
    convention: str
    grid: tuple[Setting, ...] = LR_GRID
    ours: bool = False
    requires: str | None = None


def _pytorch_optimizer(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params, model, **kw):
        import pytorch_optimizer

        return getattr(pytorch_optimizer, cls_name)(params, **kw)

    return make


def _ours(
    cls_name: str, *, module: bool = False, **fixed_kw: Any
) -> Callable[..., torch.optim.Optimizer]:
    """One of the package's optimizers; ``fixed_kw`` makes a variant (e.g. another mode)."""

    def make(params, model, **kw):
        import torch_rankone

        cls = getattr(torch_rankone, cls_name)
        kw = {**fixed_kw, **kw}
        return cls(params, module=model, **kw) if module else cls(params, **kw)

    return make


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("Adam", lambda p, m, **kw: torch.optim.Adam(p, **kw), "backward"),
        OptimizerSpec("AdamW", lambda p, m, **kw: torch.optim.AdamW(p, **kw), "backward"),
        OptimizerSpec(
            "SGD",
            lambda p, m, **kw: torch.optim.SGD(p, **{"momentum": 0.9, **kw}),
            "backward",
            grid=(scaled("lr", 10), scaled("lr", 30), scaled("lr", 100), scaled("lr", 300)),
        ),
        OptimizerSpec(
            "LBFGS",
            lambda p, m, **kw: torch.optim.LBFGS(p, **kw),
            "closure",
            grid=(scaled("lr", 1 / 3), fixed("line_search_fn", "strong_wolfe")),
        ),
        OptimizerSpec(
            "AdaHessian",
            _pytorch_optimizer("AdaHessian"),
            "create_graph",
            requires="pytorch_optimizer",
        ),
        OptimizerSpec(
            "SophiaH", _pytorch_optimizer("SophiaH"), "create_graph", requires="pytorch_optimizer"
        ),
        OptimizerSpec(
            "RankOneNewton", _ours("RankOneNewton"), "create_graph", OURS_GRID, ours=True
        ),
        # variants, defaults only: which low-rank part helps the diagonal (none / Nyström)
        OptimizerSpec(
            "RankOneNewton rank=0", _ours("RankOneNewton", rank=0), "create_graph", (), ours=True
        ),
        OptimizerSpec(
            "RankOneNewton isotropic",
            _ours("RankOneNewton", preconditioner="isotropic"),
            "create_graph",
            (),
            ours=True,
        ),
        OptimizerSpec("NeumannIHVP", _ours("NeumannIHVP"), "create_graph", OURS_GRID, ours=True),
        OptimizerSpec(
            "FisherNewton",
            _ours("FisherNewton", module=True),
            "per_sample",
            OURS_GRID,
            ours=True,
        ),
    )
}

CONVENTIONS = ("backward", "create_graph", "closure", "per_sample")


def settings_for(spec: OptimizerSpec, defaults: dict[str, Any], grid: bool) -> list[Setting]:
    """The defaults and, with ``grid``, every grid setting that changes something (a setting
    scaling a hyper-parameter that is 0 or absent is dropped)."""
    out = [DEFAULTS]
    for s in spec.grid if grid else ():
        try:
            kw = s.overrides(defaults)
        except (KeyError, TypeError):
            continue
        if any(defaults.get(k, object()) != v for k, v in kw.items()):
            out.append(s)
    return out


def default_hypers(spec: OptimizerSpec, model: nn.Module) -> dict[str, Any]:
    """The hyper-parameters of ``spec`` built from its defaults (``param_groups[0]``)."""
    opt = spec.make(list(model.parameters()), model)
    return {k: v for k, v in opt.param_groups[0].items() if k != "params"}


# ---- counting ----------------------------------------------------------------------------------


@dataclass
class Counters:
    grad_evals: int = 0
    hvps: int = 0


def _is_hvp(outputs: Any, inputs: Any, grad_outputs: Any, batched: bool) -> bool:
    """A double-backward call: gradients (shaped like the inputs) differentiated along given
    directions. A loss's gradient (scalar output) and batched per-sample backward are not."""
    if grad_outputs is None or batched:
        return False
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    ins = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    shapes = {tuple(t.shape) for t in ins}
    return bool(outs) and all(
        isinstance(o, Tensor) and o.dim() > 0 and tuple(o.shape) in shapes for o in outs
    )


@contextlib.contextmanager
def counting(model: nn.Module, counters: Counters) -> Iterator[None]:
    """Count training-mode forward passes of ``model`` and HVPs (``torch.autograd.grad`` is
    wrapped for the duration)."""
    original = torch.autograd.grad

    def grad(outputs, inputs, grad_outputs=None, *args, **kwargs):
        if _is_hvp(outputs, inputs, grad_outputs, kwargs.get("is_grads_batched", False)):
            counters.hvps += 1
        return original(outputs, inputs, grad_outputs, *args, **kwargs)

    def hook(module, args, output):
        if module.training:
            counters.grad_evals += 1

    handle = model.register_forward_hook(hook)
    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = original
        handle.remove()


def state_counters(opt: torch.optim.Optimizer) -> dict[str, int]:
    """This package's counters (``skipped_steps``, ``neumann_fallbacks``, ``safeguard_hits``, …),
    except the step count; ``{}`` for the peers."""
    counters = getattr(opt, "counters", None)
    return {k: v for k, v in counters().items() if k != "step"} if counters else {}


# ---- one run -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    workload: str
    optimizer: str
    setting: str
    seed: int
    hypers: dict[str, Any]
    status: str = "ok"  # ok | diverged | error
    error: str = ""
    final_train_loss: float = math.nan
    test_metric: float = math.nan
    metric: str = "accuracy"
    ms_per_step: float = math.nan
    steps: int = 0  # optimizer.step() calls
    iterations: int = 0  # mini-batches (LBFGS: closure evaluations)
    grad_evals: int = 0
    hvps: int = 0
    train_time_s: float = 0.0
    target_loss: float = math.nan
    time_to_target_s: float = math.nan
    iterations_to_target: float = math.nan
    counters: dict[str, int] = field(default_factory=dict)
    health_warnings: int = 0
    curve: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor, metric: str) -> tuple[float, float]:
    """Mean cross-entropy and metric on ``(x, y)`` in eval mode, in chunks."""
    was = model.training
    model.eval()
    logits = torch.cat([model(xc) for xc in x.split(4096)])
    model.train(was)
    loss = float(F.cross_entropy(logits, y))
    score = balanced_accuracy(logits, y) if metric == "balanced_accuracy" else accuracy(logits, y)
    return loss, score


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return repr(value)


def run_one(
    workload: Workload,
    spec: OptimizerSpec,
    setting: Setting,
    seed: int,
    *,
    steps: int | None = None,
    curve_points: int = CURVE_POINTS,
) -> RunResult:
    """Train ``workload``'s model from ``seed`` with ``spec`` at ``setting`` for ``steps``
    iterations (default: the workload's budget). Never raises for a failing optimizer."""
    steps = workload.steps if steps is None else steps
    torch.manual_seed(seed)
    problem: Problem = workload.build(seed)
    model = problem.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res = RunResult(
        workload.name,
        spec.name,
        setting.label,
        seed,
        {},
        metric=workload.metric,
        target_loss=workload.target_loss,
    )
    try:
        defaults = default_hypers(spec, model)
        overrides = setting.overrides(defaults)
        res.hypers = {k: _jsonable(v) for k, v in {**defaults, **overrides}.items()}
        torch.manual_seed(seed)  # the same random stream whatever default_hypers drew
        opt = spec.make(params, model, **overrides)
    except Exception as exc:  # a constructor refusing its own defaults is a result too
        res.status, res.error = "error", f"{type(exc).__name__}: {exc}"[:300]
        return res
    xs, ys = problem.x_train, problem.y_train
    counters = Counters()
    every = max(1, math.ceil(steps / curve_points))
    curve: dict[str, list[float]] = {k: [] for k in ("iteration", "grad_evals", "hvps", "time_s")}
    curve["loss"] = []
    step_ms: list[float] = []

    def record(loss: float) -> None:
        curve["iteration"].append(res.iterations)
        curve["grad_evals"].append(counters.grad_evals)
        curve["hvps"].append(counters.hvps)
        curve["time_s"].append(res.train_time_s)
        curve["loss"].append(loss)
        if loss <= workload.target_loss and math.isnan(res.time_to_target_s):
            res.time_to_target_s = res.train_time_s
            res.iterations_to_target = res.iterations

    record(_evaluate(model, xs, ys, workload.metric)[0])
    next_eval = every
    batch_iter = batches(len(ys), problem.batch_size, seed)
    with warnings.catch_warnings(record=True) as caught, counting(model, counters):
        warnings.simplefilter("always", RuntimeWarning)
        try:
            while res.iterations < steps:
                idx = next(batch_iter)
                x, y = xs[idx], ys[idx]
                evals_before = counters.grad_evals
                start = time.perf_counter()
                _step(spec.convention, opt, model, params, x, y)
                elapsed = time.perf_counter() - start
                res.train_time_s += elapsed
                res.steps += 1
                done = counters.grad_evals - evals_before if spec.convention == "closure" else 1
                res.iterations += max(done, 1)
                step_ms.append(1e3 * elapsed / max(done, 1))
                if res.iterations >= next_eval or res.iterations >= steps:
                    loss = _evaluate(model, xs, ys, workload.metric)[0]
                    record(loss)
                    next_eval = (res.iterations // every + 1) * every
                    if not math.isfinite(loss):
                        res.status = "diverged"
                        break
        except Exception as exc:  # a failing optimizer must not stop the benchmark
            res.status = "error"
            res.error = f"{type(exc).__name__}: {exc}"[:300]
        res.health_warnings = sum(
            issubclass(w.category, RuntimeWarning) and str(w.message).startswith(type(opt).__name__)
            for w in caught
        )
    res.grad_evals, res.hvps = counters.grad_evals, counters.hvps
    res.ms_per_step = statistics.median(step_ms) if step_ms else math.nan
    res.counters = state_counters(opt)
    res.curve = curve
    if res.status == "ok":
        res.final_train_loss, _ = _evaluate(model, xs, ys, workload.metric)
        if not math.isfinite(res.final_train_loss):
            res.status = "diverged"
    if res.status == "ok":
        _, res.test_metric = _evaluate(model, problem.x_test, problem.y_test, workload.metric)
    return res


def _step(
    convention: str,
    opt: torch.optim.Optimizer,
    model: nn.Module,
    params: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
) -> None:
    if convention == "per_sample":
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
        return
    if convention == "closure":

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        return
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if convention == "create_graph":
        loss.backward(create_graph=True)
        opt.step()
        opt.zero_grad(set_to_none=True)  # drop the graph (param <-> grad reference cycle)
    elif convention == "backward":
        loss.backward()
        opt.step()
    else:
        raise ValueError(f"unknown convention {convention!r}; one of {CONVENTIONS}")


# ---- many runs ---------------------------------------------------------------------------------


@dataclass
class Plan:
    workload: Workload
    spec: OptimizerSpec
    setting: Setting
    seed: int


def plan_runs(
    workloads: Sequence[str], optimizers: Sequence[str], seeds: int, grid: bool
) -> tuple[list[Plan], dict[str, str]]:
    """The runs to do, and ``{what: why}`` for the workloads/optimizers skipped."""
    import importlib.util

    skipped: dict[str, str] = {}
    wls = []
    for name in workloads:
        why = WORKLOADS[name].unavailable()
        if why:
            skipped[name] = why
        else:
            wls.append(WORKLOADS[name])
    specs = []
    for name in optimizers:
        spec = OPTIMIZERS[name]
        if spec.requires and importlib.util.find_spec(spec.requires) is None:
            skipped[name] = f"{spec.requires} is not installed (pip install -e '.[bench]')"
        else:
            specs.append(spec)
    plans = []
    for wl in wls:
        model = wl.build(0).model
        for spec in specs:
            try:
                defaults = default_hypers(spec, model)
            except Exception:  # run_one records the error (defaults only)
                defaults = {}
            for setting in settings_for(spec, defaults, grid):
                plans += [Plan(wl, spec, setting, seed) for seed in range(seeds)]
    return plans, skipped


def run(
    workloads: Sequence[str] = tuple(WORKLOADS),
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
    *,
    seeds: int = 3,
    grid: bool = True,
    quick: bool = False,
    out: Path | str = "docs/results",
    figure: Path | str | None = "docs/figures/peers.png",
    progress: bool = True,
    command: str = "python -m benchmarks.peers",
) -> tuple[list[RunResult], dict[str, str]]:
    """Run the benchmark and write ``peers.csv``, ``peers_curves.json``, ``peers.md`` (and the
    figure). ``quick``: the workloads' ``quick_steps`` budgets and 2 curve points per run."""
    plans, skipped = plan_runs(workloads, optimizers, seeds, grid)
    results: list[RunResult] = []
    bar = _progress(len(plans), progress)
    start = time.perf_counter()
    for plan in plans:
        bar.set_description(f"{plan.workload.name} {plan.spec.name} {plan.setting.label}")
        results.append(
            run_one(
                plan.workload,
                plan.spec,
                plan.setting,
                plan.seed,
                steps=plan.workload.quick_steps if quick else None,
                curve_points=1 if quick else CURVE_POINTS,
            )
        )
        bar.update(1)
    bar.close()
    total = time.perf_counter() - start
    write_outputs(results, skipped, total, out, figure, quick=quick, command=command)
    return results, skipped


def write_outputs(
    results: Sequence[RunResult],
    skipped: dict[str, str],
    total: float,
    out: Path | str,
    figure: Path | str | None,
    *,
    quick: bool = False,
    command: str = "python -m benchmarks.peers",
) -> None:
    """``peers.csv``, ``peers_curves.json``, ``peers.md``, ``peers_headline.md`` (the README's
    table), the figure, and ``peers_runs.json``
    (every run, complete: what ``--merge`` reads to combine runs made in parts)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers_runs.json").write_text(
        json.dumps({"total_s": total, "skipped": skipped, "runs": [asdict(r) for r in results]})
    )
    write_csv(results, out / "peers.csv")
    write_curves(results, out / "peers_curves.json")
    (out / "peers.md").write_text(markdown(results, skipped, total, quick=quick, command=command))
    (out / "peers_headline.md").write_text(headline(results))
    if figure is not None:
        plot(results, Path(figure))


def merge(parts: Sequence[Path | str]) -> tuple[list[RunResult], dict[str, str], float]:
    """The runs of several ``peers_runs.json`` (e.g. workloads run in parallel processes)."""
    results, skipped, total = [], {}, 0.0
    for part in parts:
        data = json.loads((Path(part) / "peers_runs.json").read_text())
        results += [RunResult(**r) for r in data["runs"]]
        skipped.update(data["skipped"])
        total += data["total_s"]
    return results, skipped, total


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:

        class _Silent:
            def set_description(self, *_):
                pass

            def update(self, *_):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, unit="run", dynamic_ncols=True)


# ---- outputs -----------------------------------------------------------------------------------

CSV_FIELDS = (
    "workload",
    "optimizer",
    "setting",
    "seed",
    "status",
    "final_train_loss",
    "test_metric",
    "metric",
    "ms_per_step",
    "steps",
    "iterations",
    "grad_evals",
    "hvps",
    "train_time_s",
    "target_loss",
    "time_to_target_s",
    "iterations_to_target",
    "skipped_steps",
    "neumann_fallbacks",
    "safeguard_hits",
    "health_warnings",
    "counters",
    "hypers",
    "error",
)


def write_csv(results: Sequence[RunResult], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {k: getattr(r, k) for k in CSV_FIELDS if hasattr(r, k)}
            for key in ("skipped_steps", "neumann_fallbacks", "safeguard_hits"):
                row[key] = r.counters.get(key, "")
            row["counters"] = json.dumps(r.counters, sort_keys=True)
            row["hypers"] = json.dumps(r.hypers, sort_keys=True)
            writer.writerow(row)


def write_curves(results: Sequence[RunResult], path: Path) -> None:
    data = [
        {
            "workload": r.workload,
            "optimizer": r.optimizer,
            "setting": r.setting,
            "seed": r.seed,
            "status": r.status,
            **r.curve,
        }
        for r in results
    ]
    path.write_text(json.dumps(data))


def _groups(results: Sequence[RunResult]) -> dict[tuple[str, str, str], list[RunResult]]:
    out: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        out.setdefault((r.workload, r.optimizer, r.setting), []).append(r)
    return out


def _score(runs: Sequence[RunResult]) -> float:
    """Mean final training loss; ``inf`` when any seed diverged or failed."""
    if any(r.status != "ok" for r in runs):
        return math.inf
    return statistics.fmean(r.final_train_loss for r in runs)


def best_settings(results: Sequence[RunResult]) -> dict[tuple[str, str], str]:
    """``(workload, optimizer) -> setting`` with the lowest mean final training loss."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for (wl, opt, setting), runs in _groups(results).items():
        score = _score(runs)
        if (wl, opt) not in best or score < best[(wl, opt)][0]:
            best[(wl, opt)] = (score, setting)
    return {k: s for k, (_, s) in best.items()}


def headline(results: Sequence[RunResult]) -> str:
    """One table for the README: every optimizer from its defaults (rows) on every workload
    (columns), the mean final training loss over the seeds and, in brackets, the mean final loss
    at the best grid setting when that is lower."""
    groups, best = _groups(results), best_settings(results)
    workloads = list(dict.fromkeys(r.workload for r in results))
    optimizers = list(dict.fromkeys(r.optimizer for r in results))
    lines = [
        "| optimizer (defaults) | " + " | ".join(workloads) + " |",
        "|---|" + "---:|" * len(workloads),
    ]
    for opt in optimizers:
        cells = []
        for wl in workloads:
            runs = groups.get((wl, opt, "defaults"))
            if not runs:
                cells.append("—")
                continue
            score = _score(runs)
            cell = _fmt(score) if math.isfinite(score) else "diverged"
            tuned = best.get((wl, opt), "defaults")
            tuned_score = _score(groups[(wl, opt, tuned)])
            if tuned != "defaults" and tuned_score < 0.99 * score:
                cell += f" ({_fmt(tuned_score)})"
            cells.append(cell)
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}g}"


def _summary_row(name: str, setting: str, runs: Sequence[RunResult]) -> str:
    ok = [r for r in runs if r.status == "ok"]
    n = len(runs)
    if ok:
        losses = [r.final_train_loss for r in ok]
        loss = _fmt(statistics.fmean(losses))
        if len(losses) > 1:
            loss += f" ± {_fmt(statistics.stdev(losses), 2)}"
        acc = f"{statistics.fmean(r.test_metric for r in ok):.3f}"
    else:
        loss, acc = "—", "—"
    bad = n - len(ok)
    if bad:
        kinds = sorted({r.status for r in runs if r.status != "ok"})
        loss += f" ({bad}/{n} {'/'.join(kinds)})"
    finite_ms = [r.ms_per_step for r in runs if math.isfinite(r.ms_per_step)]
    ms = _fmt(statistics.fmean(finite_ms)) if finite_ms else "—"
    grads = statistics.fmean(r.grad_evals for r in runs)
    hvps = statistics.fmean(r.hvps for r in runs)
    evals = f"{grads:.0f} + {hvps:.0f}"
    reached = [r.time_to_target_s for r in runs if math.isfinite(r.time_to_target_s)]
    ttt = f"{statistics.fmean(reached):.2f} ({len(reached)}/{n})" if reached else f"— (0/{n})"
    flags = {}
    for r in runs:
        for key, value in r.counters.items():
            flags[key] = flags.get(key, 0) + value
    notes = ", ".join(f"{k} {v / n:g}" for k, v in sorted(flags.items()) if v)
    if any(r.health_warnings for r in runs):
        notes += (", " if notes else "") + "warned"
    return f"| {name} | {setting} | {loss} | {acc} | {ms} | {evals} | {ttt} | {notes} |"


def markdown(
    results: Sequence[RunResult],
    skipped: dict[str, str],
    total_s: float,
    *,
    quick: bool = False,
    command: str = "python -m benchmarks.peers",
) -> str:
    """One table per workload: every optimizer from its defaults and at its best grid setting."""
    groups = _groups(results)
    best = best_settings(results)
    seeds = sorted({r.seed for r in results})
    lines = [
        "# Peer benchmark" + (" (quick smoke run: numbers mean nothing)" if quick else ""),
        "",
        f"`{command}`: {len(results)} runs, "
        f"seeds {', '.join(map(str, seeds)) or '—'}, {total_s / 60:.1f} min, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s).",
        "",
        "Columns: final training loss (whole training set, mean ± std over seeds), test accuracy "
        "(balanced on w8a), median ms per step (LBFGS: per closure evaluation), gradient "
        "evaluations + HVPs per run, training seconds to the target loss (seeds that reached "
        "it), optimizer counters per run. *best* is the grid setting with the lowest mean final "
        "training loss.",
    ]
    for name, why in skipped.items():
        lines += ["", f"Skipped {name}: {why}."]
    for wl_name in dict.fromkeys(r.workload for r in results):
        wl = WORKLOADS[wl_name]
        lines += [
            "",
            f"## {wl.title} (`{wl.name}`): target loss {wl.target_loss:g}, {wl.steps} iterations"
            if not quick
            else f"## {wl.title} (`{wl.name}`)",
            "",
            "| optimizer | setting | final train loss | test "
            + ("bal. acc" if wl.metric == "balanced_accuracy" else "acc")
            + " | ms/step | grad + HVP evals | s to target | counters |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for opt in dict.fromkeys(r.optimizer for r in results if r.workload == wl_name):
            lines.append(_summary_row(opt, "defaults", groups[(wl_name, opt, "defaults")]))
            b = best[(wl_name, opt)]
            if b != "defaults":
                lines.append(_summary_row(opt, f"best: {b}", groups[(wl_name, opt, b)]))
    return "\n".join(lines) + "\n"


def _mean_curve(runs: Sequence[RunResult]) -> tuple[list[float], list[float]]:
    """Mean time and mean loss at each curve point all seeds share."""
    curves = [r.curve for r in runs if r.curve.get("loss")]
    if not curves:
        return [], []
    n = min(len(c["loss"]) for c in curves)
    t = [statistics.fmean(c["time_s"][i] for c in curves) for i in range(n)]
    loss = [statistics.fmean(c["loss"][i] for c in curves) for i in range(n)]
    return t, loss


def plot(results: Sequence[RunResult], path: Path) -> None:
    """Training loss against training wall-clock (log-log), one panel per workload: every
    optimizer from its defaults (solid) and at its best grid setting (dashed, if different);
    the package's optimizers drawn thicker, the target loss dotted. Losses beyond 3× the
    initial loss are cut off (the y axis would otherwise be spent on a divergence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = _groups(results)
    best = best_settings(results)
    wls = list(dict.fromkeys(r.workload for r in results))
    opts = list(dict.fromkeys(r.optimizer for r in results))
    colors = {o: plt.get_cmap("tab10")(i % 10) for i, o in enumerate(opts)}
    ncols = min(2, max(1, len(wls)))
    nrows = math.ceil(max(1, len(wls)) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows + 0.9), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(wls) :]:
        ax.set_visible(False)
    for ax, wl in zip(flat, wls):
        start = [r.curve["loss"][0] for r in results if r.workload == wl and r.curve.get("loss")]
        ceiling = 3 * max((v for v in start if math.isfinite(v)), default=10.0)
        for opt in opts:
            spec = OPTIMIZERS.get(opt)
            for setting, style in (("defaults", "-"), (best.get((wl, opt)), "--")):
                if setting is None or (style == "--" and setting == "defaults"):
                    continue
                runs = groups.get((wl, opt, setting))
                if not runs:
                    continue
                t, loss = _mean_curve(runs)
                pts = [(a, b) for a, b in zip(t, loss) if a > 0 and math.isfinite(b) and b > 0]
                pts = [(a, min(b, ceiling)) for a, b in pts]
                if pts:
                    lw = 2.2 if spec is not None and spec.ours else 1.2
                    ax.plot(*zip(*pts), style, color=colors[opt], lw=lw)
        ax.axhline(WORKLOADS[wl].target_loss, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("training loss")
        ax.set_title(WORKLOADS[wl].title, fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    handles = [
        Line2D([], [], color=colors[o], lw=2.2 if o in OPTIMIZERS and OPTIMIZERS[o].ours else 1.2)
        for o in opts
    ]
    handles += [Line2D([], [], color="k", ls="-"), Line2D([], [], color="k", ls="--")]
    labels = [*opts, "defaults", "best grid setting"]
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.9 / (3.6 * nrows + 0.9), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 seed")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS)
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--no-grid", action="store_true", help="defaults only")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for csv/json/md (default docs/results; with --quick a temporary folder, so "
        "that a smoke run never overwrites the results)",
    )
    parser.add_argument("--figure", default=None, help="default: OUT/../figures/peers.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="run nothing: combine the peers_runs.json of these folders (parts run in parallel) "
        "into --out and the figure",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        out = Path(args.out or "docs/results")
        results, skipped, total = merge(args.merge)
        command = "python -m benchmarks.peers (parts: " + ", ".join(args.merge) + ")"
        write_outputs(
            results,
            skipped,
            total,
            out,
            args.figure or out.parent / "figures" / "peers.png",
            command=command,
        )
        print(out / "peers.md")
        return 0
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if args.out is None:
        quick_dir = Path(tempfile.gettempdir()) / "torch_rankone_peers_quick" / "results"
        args.out = str(quick_dir) if args.quick else "docs/results"
    figure = args.figure or Path(args.out).parent / "figures" / "peers.png"
    results, skipped = run(
        args.workloads,
        args.optimizers,
        seeds=seeds,
        grid=not (args.no_grid or args.quick),
        quick=args.quick,
        out=args.out,
        figure=figure,
        progress=not args.no_progress,
        command=" ".join(
            ["python -m benchmarks.peers", *(argv if argv is not None else sys.argv[1:])]
        ),
    )
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(Path(args.out) / "peers.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
