"""GPU benchmarks (``cuda``-marked, skipped without a GPU; ``scripts/gpu_check.sh`` runs them).

* kernels (``results/ext_cuda.txt``): ``lowrank_solve_update`` (float32, parameters split into
  four tensors) for N ∈ {1e6, 1e7, 1e8}, k ∈ {1, 2, 8}: the fused CUDA op vs the unfused PyTorch
  reference, and its achieved bandwidth vs a device ``copy_`` moving as many bytes (the practical
  memory limit; the op's minimum traffic is ``(2k + 4)·N`` numbers); ``gathered_outer_accumulate``
  (float64, rows of a 5000 × d matrix) for d ∈ {300, 2000}, t ∈ {142, 1000} vs ``index_select`` +
  ``addmm_``.
* optimizer steps (``results/optim_cuda.txt``): MLP 784-1024-256-10, batch 128, float32: one
  step (forward + backward + update) of RankOneNewton (default, and isotropic with and without
  the compiled kernels) and NeumannIHVP (fixed scale, 10 terms) against one Adam step.
* NewtonLearn (``results/newton_learn_cuda.txt``): NL1 on a9a (80 nodes × 407 rows) and w8a
  (142 × 350), λ = 1e-3, RandK(1), until ``P − P* ≤ 1e-10``, on the GPU and on the CPU; the data
  are read from ``shared/data/libsvm`` (``torch_rankone.data.find_libsvm``; never downloaded),
  and the datasets not found are skipped.

Every time is the minimum over its rounds of a call followed by ``torch.cuda.synchronize()``
(small cases repeat the call ``inner`` times before the synchronisation, and the time is
divided). ``python -m pytest tests/benchmarks/test_bench_cuda.py --benchmark-enable -s`` prints
the tables and writes them to ``tests/benchmarks/results/*_cuda.txt`` and, when the environment
variable ``OUT`` names a folder, there too. In the default (``--benchmark-disable``) run every
case executes once as a smoke test.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import torch
from _kernel_report import lowrank_table

from torch_rankone import NeumannIHVP, NewtonLearn, RankOneNewton, _ext

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RESULTS = Path(__file__).parent / "results"
DEV = "cuda"
SIZES = [10**6, 10**7, 10**8]
RANKS = [1, 2, 8]
DIMS = [300, 2000]
DEPTHS = [142, 1000]
MLP = (784, 1024, 256, 10)
# name: (nodes, rows per node), as in the paper's experiments
DATASETS = {"a9a": (80, 407), "w8a": (142, 350)}
LAM = 1e-3
_best: dict[tuple, float] = {}
_runs: dict[tuple, dict] = {}


def _sync() -> None:
    torch.cuda.synchronize()


def _cuda_ext() -> bool:
    return _ext.has_extension() and bool(_ext._C.with_cuda)


needs_cuda_ext = pytest.mark.skipif(
    not _cuda_ext(), reason="torch_rankone._C was built without CUDA"
)


def _time(benchmark, key: tuple, fn, rounds: int, inner: int = 1) -> None:
    def run():
        for _ in range(inner):
            fn()
        _sync()

    benchmark.group = " ".join(map(str, key[:-1]))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
    if benchmark.stats is not None:  # None when benchmarks are disabled
        _best[key] = benchmark.stats.stats.min / inner


def _device_name() -> str:
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"torch_rankone._C with CUDA: {_cuda_ext()}"
    )


def _write(name: str, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    folders = [RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)  # one problem alive at a time: N = 1e8, k = 8 takes ~12 GB
def _lowrank(n: int, k: int):
    gen = torch.Generator(device=DEV).manual_seed(0)
    sizes = [n // 2, 3 * n // 10, n - n // 2 - 3 * n // 10 - 100, 100]

    def draw(size):
        return torch.randn(size, generator=gen, device=DEV)

    params, g = [draw(s) for s in sizes], [draw(s) for s in sizes]
    U = [[draw(s) for s in sizes] for _ in range(k)]
    C = torch.eye(k, dtype=torch.float64) / n
    src = draw((k + 2) * n)  # a copy moving (2k + 4)·N numbers, the op's minimum traffic
    return params, g, U, C, src, torch.empty_like(src)


def _lowrank_rounds(n: int) -> tuple[int, int]:
    """(rounds, inner) per size."""
    return {10**6: (20, 20), 10**7: (20, 2)}.get(n, (5, 1))


@pytest.mark.parametrize("k", RANKS)
@pytest.mark.parametrize("n", SIZES)
def test_lowrank_reference(benchmark, n, k):
    params, g, U, C, *_ = _lowrank(n, k)
    fn = lambda: _ext.lowrank_solve_update_reference(params, g, U, C, 1.0, 1e-6)  # noqa: E731
    _time(benchmark, ("lowrank", n, k, "reference"), fn, *_lowrank_rounds(n))


@needs_cuda_ext
@pytest.mark.parametrize("k", RANKS)
@pytest.mark.parametrize("n", SIZES)
def test_lowrank_extension(benchmark, n, k):
    params, g, U, C, *_ = _lowrank(n, k)
    fn = lambda: _ext.lowrank_solve_update(params, g, U, C, 1.0, 1e-6)  # noqa: E731
    _time(benchmark, ("lowrank", n, k, "extension"), fn, *_lowrank_rounds(n))


@pytest.mark.parametrize("k", RANKS)
@pytest.mark.parametrize("n", SIZES)
def test_lowrank_copy_bandwidth(benchmark, n, k):
    *_, src, dst = _lowrank(n, k)
    _time(benchmark, ("lowrank", n, k, "copy"), lambda: dst.copy_(src), *_lowrank_rounds(n))


@functools.lru_cache(maxsize=1)
def _outer(d: int, t: int):
    gen = torch.Generator(device=DEV).manual_seed(1)
    A = torch.randn(5000, d, generator=gen, dtype=torch.float64, device=DEV)
    idx = torch.randint(0, 5000, (t,), generator=gen, device=DEV)
    coef = torch.rand(t, generator=gen, dtype=torch.float64, device=DEV)
    return torch.zeros(d, d, dtype=torch.float64, device=DEV), A, idx, coef


@pytest.mark.parametrize("t", DEPTHS)
@pytest.mark.parametrize("d", DIMS)
def test_outer_addmm(benchmark, d, t):
    H, A, idx, coef = _outer(d, t)
    fn = lambda: _ext.gathered_outer_accumulate_reference(H, A, idx, coef)  # noqa: E731
    _time(benchmark, ("outer", d, t, "addmm"), fn, 20, 10 if d == 300 else 1)


@needs_cuda_ext
@pytest.mark.parametrize("t", DEPTHS)
@pytest.mark.parametrize("d", DIMS)
def test_outer_extension(benchmark, d, t):
    H, A, idx, coef = _outer(d, t)
    fn = lambda: _ext.gathered_outer_accumulate(H, A, idx, coef)  # noqa: E731
    _time(benchmark, ("outer", d, t, "extension"), fn, 20, 10 if d == 300 else 1)


def test_report_kernels():
    if ("lowrank", 10**7, 2, "extension") not in _best:
        pytest.skip("timings need --benchmark-enable and the CUDA extension")
    lines = [
        f"GPU: {_device_name()}; min over rounds",
        "",
        *lowrank_table(_best, SIZES, RANKS, ms=3, gbs=0),
    ]
    lines += [
        "",
        "gathered_outer_accumulate, float64, H d×d += Σ_t coef_t a a^T over t rows of 5000×d",
        f"{'d':>5s} {'t':>5s} {'addmm ms':>9s} {'ext ms':>8s} {'vs addmm':>9s}",
    ]
    for d in DIMS:
        for t in DEPTHS:
            keys = [("outer", d, t, v) for v in ("addmm", "extension")]
            if all(key in _best for key in keys):
                mm, ext = (_best[key] for key in keys)
                lines.append(f"{d:5d} {t:5d} {1e3 * mm:9.4f} {1e3 * ext:8.4f} {mm / ext:8.2f}x")
    _write("ext_cuda.txt", lines)


# --------------------------------------------------------------------------------------------
# Optimizer steps against Adam
# --------------------------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    layers = []
    for i, (m, n) in enumerate(zip(MLP[:-1], MLP[1:])):
        layers += [torch.nn.Linear(m, n)] + ([torch.nn.Tanh()] if i < len(MLP) - 2 else [])
    return torch.nn.Sequential(*layers).to(DEV)


def _batch(b: int = 128):
    gen = torch.Generator(device=DEV).manual_seed(b)
    X = torch.randn(b, MLP[0], generator=gen, device=DEV)
    return X, torch.randint(0, MLP[-1], (b,), generator=gen, device=DEV)


def _ce(model, X, y):
    return torch.nn.functional.cross_entropy(model(X), y)


@pytest.fixture(params=["ext", "no ext"])
def kernels(request, monkeypatch) -> str:
    if request.param == "ext" and not _cuda_ext():
        pytest.skip("torch_rankone._C was built without CUDA")
    if request.param == "no ext":
        monkeypatch.setattr(_ext, "_C", None)
    return request.param


def _step_time(benchmark, name: str, fn) -> None:
    _time(benchmark, ("optim", name), fn, rounds=30)


def test_adam_step(benchmark):
    model, (X, y) = _model(), _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        _ce(model, X, y).backward()
        opt.step()

    _step_time(benchmark, "Adam", run)


def _generator():
    return torch.Generator(device=DEV).manual_seed(0)


def test_rank_one_newton_default_step(benchmark):
    model, (X, y) = _model(), _batch()
    opt = RankOneNewton(model.parameters(), generator=_generator())
    _step_time(benchmark, "RankOneNewton default", lambda: opt.step(lambda: _ce(model, X, y)))


def test_rank_one_newton_isotropic_step(benchmark, kernels):
    model, (X, y) = _model(), _batch()
    opt = RankOneNewton(
        model.parameters(), lr=1e-3, damping=10.0, preconditioner="isotropic",
        damping_mode="fixed", generator=_generator(),
    )  # fmt: skip
    _step_time(
        benchmark,
        f"RankOneNewton isotropic, {kernels}",
        lambda: opt.step(lambda: _ce(model, X, y)),
    )


def test_neumann_ihvp_step(benchmark):
    model, (X, y) = _model(), _batch()
    opt = NeumannIHVP(
        model.parameters(), lr=0.5, damping=1e-2, damping_mode="fixed", scale=50.0,
        num_terms=10, generator=_generator(),
    )  # fmt: skip
    _step_time(
        benchmark, "NeumannIHVP fixed scale, 10 terms", lambda: opt.step(lambda: _ce(model, X, y))
    )


def test_report_optim():
    steps = {key[1]: v for key, v in _best.items() if key[0] == "optim"}
    if "Adam" not in steps:
        pytest.skip("timings need --benchmark-enable")
    adam = steps["Adam"]
    lines = [
        f"GPU: {_device_name()}",
        f"MLP {'-'.join(map(str, MLP))}, batch 128, float32; one step = forward + backward "
        "(+ HVPs) + update; min over 30 rounds",
        "",
        f"{'optimizer':<40s} {'ms/step':>9s} {'x Adam':>8s}",
    ]
    for name, t in steps.items():
        lines.append(f"{name:<40s} {1e3 * t:9.3f} {t / adam:7.2f}x")
    _write("optim_cuda.txt", lines)


# --------------------------------------------------------------------------------------------
# NewtonLearn on a9a and w8a
# --------------------------------------------------------------------------------------------


@functools.cache
def _dataset(name: str):
    from torch_rankone.data import CANONICAL_FEATURES, find_libsvm, load_libsvm

    path = find_libsvm(name)
    if path is None:
        return None
    A, b = load_libsvm(path, CANONICAL_FEATURES[name], dtype=torch.float64)
    nodes, rows = DATASETS[name]
    return A[: nodes * rows].contiguous(), b[: nodes * rows].contiguous()


@functools.cache
def _optimum(name: str) -> float:
    from torch_rankone.glm import glm_newton

    A, b = _dataset(name)
    _, values = glm_newton(A.to(DEV), b.to(DEV), lam=LAM, iterations=20)
    return float(values[-1])


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("name", list(DATASETS))
def test_newton_learn_to_1e10(request, name, device):
    data = _dataset(name)
    if data is None:
        pytest.skip(f"{name} not found in shared/data/libsvm (not downloaded)")
    A, b = (t.to(device) for t in data)
    p_star = _optimum(name)
    timing = request.config.getoption("benchmark_enable") or not request.config.getoption(
        "benchmark_disable"
    )
    limit = 2000 if timing else 3
    _sync()
    start = time.perf_counter()
    x = torch.zeros(A.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    opt = NewtonLearn([x], A, b, num_nodes=DATASETS[name][0], lam=LAM,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    init = time.perf_counter() - start
    while float(opt.step()) - p_star > 1e-10 and len(opt.history) < limit:
        pass
    _sync()
    total = time.perf_counter() - start
    if timing:
        assert float(opt.history[-1]["loss"]) - p_star <= 1e-10, "NL1 did not reach 1e-10"
        _runs[(name, device)] = dict(iterations=len(opt.history), total=total, init=init)


def test_report_newton_learn():
    if not _runs:
        pytest.skip("timings need --benchmark-enable and a9a/w8a in shared/data/libsvm")
    lines = [
        f"GPU: {_device_name()}; CPU: {torch.get_num_threads()} intra-op threads",
        f"NewtonLearn NL1, lambda={LAM}, RandK(1), simulated nodes, float64, x0 = 0, "
        "until P - P* <= 1e-10 (P* from 20 Newton iterations); construction included",
        "",
        f"{'data':<5s} {'nodes x rows':>13s} {'device':>7s} {'iterations':>11s} {'total s':>8s} "
        f"{'construction s':>15s} {'ms/iteration':>13s}",
    ]
    for (name, device), run in _runs.items():
        nodes, rows = DATASETS[name]
        per = 1e3 * (run["total"] - run["init"]) / run["iterations"]
        lines.append(
            f"{name:<5s} {f'{nodes} x {rows}':>13s} {device:>7s} {run['iterations']:11d} "
            f"{run['total']:8.2f} {run['init']:15.2f} {per:13.3f}"
        )
    _write("newton_learn_cuda.txt", lines)
