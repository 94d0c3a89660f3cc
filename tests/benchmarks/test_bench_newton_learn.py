"""NewtonLearn NL1 on w8a (n = 142 nodes, m = 350, d = 300, λ = 1e-3, RandK(1)), simulated
mode, CPU: wall time per iteration split into its phases, against one exact Newton iteration on
the same data, and the total time to ``P − P* ≤ 1e-10`` (SPEC §4.4 acceptance; goal ≤ 11 s on
the project's 2-core machine, where an optimised C++ FedNL needs about 111 s and the naive dense
NL1 about 470 s).

Phases of one NL1 iteration (what ``NewtonLearn.step`` does, timed function by function):

* gradient — margins ``Ax``, ``Σφ``, ``Aᵀφ'`` and ``h(x) = φ''`` for all nodes (CSR products);
* h-update — RandK(1) draws for all nodes, ``[h + η C(h(x) − h)]_+``, the changed indices;
* accumulation — ``H += Σ coef a aᵀ`` over the 142 changed rows (``gathered_outer_accumulate``);
* solve — Cholesky of ``H + λI`` (float64) and the two triangular solves.

Threads: the module runs with ``torch.set_num_threads(1)``. One iteration's operations are small
(vectors of 50k entries, 300×300 matrices), and on this 2-core machine shared with other jobs a
second intra-op thread makes every parallel region wait for a descheduled core: measured 104 s
to 1e-10 with 2 threads at load average ~3 against 2.8 s with 1 thread.

Timings: ``python -m pytest tests/benchmarks/test_bench_newton_learn.py --benchmark-enable -s``;
the last test prints the table and writes ``tests/benchmarks/results/newton_learn_cpu.txt``.
Each phase time is the minimum over its rounds (shared machine). In the default
(``--benchmark-disable``) run every case executes once as a smoke test.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import torch

from torch_rankone import NewtonLearn, _ext
from torch_rankone.glm import glm_newton, glm_node_terms
from torch_rankone.linalg import newton_direction, shifted
from torch_rankone.optim.newton_learn import learn_coefficients

RESULTS = Path(__file__).parent / "results" / "newton_learn_cpu.txt"
N_NODES, M_ROWS, LAM = 142, 350, 1e-3
WARM_STEPS = 50  # iterations before the phases are timed (messages are non-zero by then)
_best: dict[str, float] = {}
_run: dict[str, float] = {}


@functools.cache
def w8a():
    from torch_rankone.data import libsvm

    try:
        A, b = libsvm("w8a", dtype=torch.float64)
    except FileNotFoundError as exc:
        pytest.skip(f"w8a not available: {exc}")
    A, b = A[: N_NODES * M_ROWS].contiguous(), b[: N_NODES * M_ROWS].contiguous()
    _, values = glm_newton(A, b, lam=LAM, iterations=20)
    return A, b, values[-1]


@functools.cache
def warm_optimizer():
    A, b, _ = w8a()
    x = torch.zeros(A.shape[1], dtype=torch.float64, requires_grad=True)
    opt = NewtonLearn([x], A, b, num_nodes=N_NODES, generator=torch.Generator().manual_seed(0))
    for _ in range(WARM_STEPS):
        opt.step()
    return opt, x


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _time(benchmark, key: str, fn, rounds: int = 30) -> None:
    benchmark.group = "newton_learn w8a"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2)
    if benchmark.stats is not None:  # None when benchmarks are disabled
        _best[key] = benchmark.stats.stats.min


def _phase_inputs():
    opt, x = warm_optimizer()
    state = opt.state[x]
    xv = x.detach().reshape(-1)
    _, grad_sum, hx = glm_node_terms(opt._shard, opt._targets, xv, opt.loss)
    return opt, state, xv, grad_sum, hx.reshape(state["h"].shape)


def test_phase_gradient(benchmark):
    opt, _, xv, _, _ = _phase_inputs()
    _time(benchmark, "gradient", lambda: glm_node_terms(opt._shard, opt._targets, xv, opt.loss))


def test_phase_h_update(benchmark):
    opt, state, _, _, hx = _phase_inputs()
    h = state["h"]
    gen_state = opt.generator.get_state()

    def h_update():
        message = opt._compress(hx - h)
        _, change, _ = learn_coefficients("nl1", h, hx, message, opt.eta, None)
        return change.reshape(-1).nonzero()

    _time(benchmark, "h-update", h_update)
    opt.generator.set_state(gen_state)  # the warm run's randomness is left as it was


def test_phase_accumulation(benchmark):
    opt, state, _, _, _ = _phase_inputs()
    H = state["H"].clone()
    idx = torch.randint(0, N_NODES * M_ROWS, (N_NODES,), generator=torch.Generator().manual_seed(1))
    coef = torch.full((N_NODES,), 1e-7, dtype=torch.float64)
    _time(
        benchmark,
        "accumulation",
        lambda: _ext.gathered_outer_accumulate(H, opt._shard.A, idx, coef),
    )


def test_phase_solve(benchmark):
    opt, state, xv, grad_sum, _ = _phase_inputs()
    g = grad_sum / (N_NODES * M_ROWS) + LAM * xv
    _time(benchmark, "solve", lambda: newton_direction(shifted(state["H"], LAM), g))


def test_full_nl1_step(benchmark):
    opt, _ = warm_optimizer()
    _time(benchmark, "NL1 step", opt.step)


def test_exact_newton_iteration(benchmark):
    """One exact Newton iteration on the same data: gradient, the full Hessian
    ``Aᵀ diag(h) A / N`` (CSR × dense), the solve."""
    opt, _, xv, _, _ = _phase_inputs()
    N = N_NODES * M_ROWS

    def newton():
        _, grad_sum, hx = glm_node_terms(opt._shard, opt._targets, xv, opt.loss)
        H = opt._shard.weighted_gram(hx) / N
        return newton_direction(shifted(H, LAM), grad_sum / N + LAM * xv)

    _time(benchmark, "exact Newton iteration", newton, rounds=5)


def _nl1_to_1e10(A, b, p_star):
    start = time.perf_counter()
    x = torch.zeros(A.shape[1], dtype=torch.float64, requires_grad=True)
    opt = NewtonLearn([x], A, b, num_nodes=N_NODES, generator=torch.Generator().manual_seed(0))
    init = time.perf_counter() - start
    while float(opt.step()) - p_star > 1e-10 and len(opt.history) < 2000:
        pass
    total = time.perf_counter() - start
    return dict(
        iterations=len(opt.history), total=total, init=init, bits=float(opt.state[x]["bits_sent"])
    )


def test_total_time_to_1e10(request):
    """NL1 from x⁰ = 0 until ``P − P* ≤ 1e-10`` (construction — CSR copies, ``h⁰``, ``H⁰`` —
    included); P* from 20 float64 Newton iterations. Timing runs (``--benchmark-enable``) take
    the best of up to 3 runs (the machine is shared with other jobs) and fail above the 11 s
    goal; the smoke run checks convergence and the iteration count only."""
    A, b, p_star = w8a()
    cfg = request.config
    timing = cfg.getoption("benchmark_enable") or not cfg.getoption("benchmark_disable")
    for _ in range(3 if timing else 1):
        run = _nl1_to_1e10(A, b, p_star)
        if not _run or run["total"] < _run["total"]:
            _run.update(run)
        if _run["total"] <= 11.0:
            break
    assert _run["iterations"] <= 600  # measured: 435 (deterministic for the seed)
    if timing:
        assert _run["total"] <= 11.0, f"NL1 on w8a took {_run['total']:.1f} s to 1e-10 (goal 11 s)"


def test_report():
    """The table (only when the timing tests ran with --benchmark-enable)."""
    phases = ["gradient", "h-update", "accumulation", "solve"]
    if not all(k in _best for k in [*phases, "NL1 step", "exact Newton iteration"]) or not _run:
        pytest.skip("timings need --benchmark-enable and the whole module")
    ms = {k: v * 1e3 for k, v in _best.items()}
    lines = [
        f"NewtonLearn NL1, w8a (n={N_NODES}, m={M_ROWS}, d=300), lambda={LAM}, RandK(1), "
        "simulated mode, float64, CPU",
        f"torch {torch.__version__}, intra-op threads: {torch.get_num_threads()}, "
        f"compiled kernels: {_ext.has_extension()}, load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (machine shared with other jobs)",
        "",
        f"{'phase':<28}{'ms/iteration (min)':>20}",
        *[f"{k:<28}{ms[k]:>20.3f}" for k in phases],
        f"{'sum of phases':<28}{sum(ms[k] for k in phases):>20.3f}",
        f"{'NL1 step (measured)':<28}{ms['NL1 step']:>20.3f}",
        f"{'exact Newton iteration':<28}{ms['exact Newton iteration']:>20.3f}",
        "",
        f"NL1 to P - P* <= 1e-10: {_run['iterations']} iterations, {_run['total']:.2f} s "
        f"(construction {_run['init']:.2f} s), {_run['bits']:.4g} bits (realistic, all nodes)",
        f"  (best of up to 3 runs; iterations x min step + construction = "
        f"{_run['iterations'] * _best['NL1 step'] + _run['init']:.2f} s)",
        "goal: <= 11 s (optimised C++ FedNL ~111 s, naive dense NL1 ~470 s on this machine)",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
