"""Cost of one Hessian-vector product relative to one gradient, MLP of about 1M parameters.

Run the timings with ``python -m pytest tests/benchmarks/test_bench_hvp.py --benchmark-enable``;
the last test prints the side-by-side ratios (all measured in the same run), writes them to
``tests/benchmarks/results/hvp_cpu.txt`` and checks the goal (faster HVP path ≤ 3 gradients).
In the default (``--benchmark-disable``) run each case executes once as a smoke test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, jvp

from torch_rankone.curvature import graph_hvp, hvp

SIZES = (784, 1024, 256, 10)  # 784·1024 + 1024·256 + 256·10 + biases = 1,068,810 parameters
BATCH = 128
RESULTS = Path(__file__).parent / "results" / "hvp_cpu.txt"
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    layers = []
    for i, (m, n) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers += [torch.nn.Linear(m, n)] + ([torch.nn.Tanh()] if i < len(SIZES) - 2 else [])
    model = torch.nn.Sequential(*layers)
    X, y = torch.randn(BATCH, SIZES[0]), torch.randint(0, SIZES[-1], (BATCH,))
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    return model, params, v, X, y


def _loss(model, X, y):
    return lambda ps: torch.nn.functional.cross_entropy(functional_call(model, ps, (X,)), y)


def _run(benchmark, fn):
    """Fixed rounds so that every path gets the same number of samples in one run."""
    benchmark.group = "hvp-vs-grad"
    benchmark.pedantic(fn, rounds=30, warmup_rounds=3)


def _record(name, benchmark):
    if benchmark.stats is not None:  # None when benchmarks are disabled
        _medians[name] = benchmark.stats.stats.median


def test_numel(problem):
    assert sum(p.numel() for p in problem[1].values()) == 1_068_810


def test_gradient(benchmark, problem):
    model, params, _, X, y = problem
    plist = list(params.values())

    def run():
        loss = torch.nn.functional.cross_entropy(model(X), y)
        return torch.autograd.grad(loss, plist)

    _run(benchmark, run)
    _record("gradient", benchmark)


def test_hvp_reverse_over_reverse(benchmark, problem):
    model, params, v, X, y = problem
    plist, vlist = list(params.values()), list(v.values())

    def run():
        loss = torch.nn.functional.cross_entropy(model(X), y)
        grads = torch.autograd.grad(loss, plist, create_graph=True)
        return graph_hvp(grads, plist, vlist, retain_graph=False)

    _run(benchmark, run)
    _record("hvp reverse-over-reverse (from scratch)", benchmark)


def test_hvp_forward_over_reverse(benchmark, problem):
    model, params, v, X, y = problem
    detached = {k: p.detach() for k, p in params.items()}
    f = _loss(model, X, y)
    _run(benchmark, lambda: hvp(f, detached, v))
    _record("hvp forward-over-reverse (from scratch)", benchmark)


def test_grad_and_hvp_forward_over_reverse(benchmark, problem):
    """``jvp(grad(f))`` also returns the gradient: what an optimizer step actually needs."""
    model, params, v, X, y = problem
    detached = {k: p.detach() for k, p in params.items()}
    f = _loss(model, X, y)
    _run(benchmark, lambda: jvp(grad(f), (detached,), (v,)))
    _record("gradient + hvp, forward-over-reverse", benchmark)


def test_extra_hvp_on_existing_graph(benchmark, problem):
    """One more product at the same point (a Neumann term), given create_graph gradients."""
    model, params, v, X, y = problem
    plist, vlist = list(params.values()), list(v.values())
    loss = torch.nn.functional.cross_entropy(model(X), y)
    grads = torch.autograd.grad(loss, plist, create_graph=True)
    _run(benchmark, lambda: graph_hvp(grads, plist, vlist))
    _record("extra hvp on an existing graph", benchmark)


def test_report_ratios():
    """Side-by-side ratios of the medians above; the goal is ≤ 3 for the faster HVP path."""
    if "gradient" not in _medians:
        pytest.skip("timings need --benchmark-enable")
    base = _medians["gradient"]
    lines = [
        f"MLP {SIZES}, {1_068_810:,} parameters, batch {BATCH}, float32, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        f"{'path':45s} {'median ms':>10s} {'/ gradient':>10s}",
    ]
    for name, t in _medians.items():
        lines.append(f"{name:45s} {1e3 * t:10.2f} {t / base:10.2f}")
    report = "\n".join(lines)
    print("\n" + report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report + "\n")
    fastest = min(
        _medians["hvp reverse-over-reverse (from scratch)"],
        _medians["hvp forward-over-reverse (from scratch)"],
    )
    assert fastest / base <= 3.0, report
