"""GPU readiness: what a static review of the CUDA path found, one test per fix.

* the in-place lowrank op's ``applied`` flag agrees between the CUDA op, the CPU op and the
  pure-PyTorch reference in every case (empty tensors with a NaN ``lr`` or ``c ∈ {0, inf}``
  included), and it tests each value the update pass tests, not their sum;
* an out-of-range index of ``gathered_outer_accumulate`` raises ``IndexError`` before any kernel
  runs wherever the check is free (host indices), instead of a device-side assert;
* the Gram pass of the lowrank ops declares ``__launch_bounds__`` with a minimum of blocks per SM
  (k = 8 would otherwise need ~140 registers per thread, one block per SM);
* the compiled lowrank ops refuse CUDA-graph capture (their per-call pinned pointer table would
  be replayed stale);
* ADIANA draws its coin on its generator's device (a CUDA generator works);
* an ordinary CUDA step of RankOneNewton (default and isotropic) and of NeumannIHVP with a given
  scale does not synchronise with the host between the documented sync points.

CPU tests show what can be shown without a GPU; ``cuda`` tests skip cleanly without one
(``scripts/gpu_check.sh`` runs them on a GPU machine).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton, _ext
from torch_rankone.distributed import RandK
from torch_rankone.distributed import baselines as bl

ROOT = Path(__file__).resolve().parents[1]
F32, F64 = torch.float32, torch.float64
NAN, INF = math.nan, math.inf
ops = torch.ops.torch_rankone

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


def flat(U):
    return [t for u in U for t in u]


def compiled_op_on(device: str) -> bool:
    """The compiled ops exist for ``device`` (the CPU build always has the CPU ones)."""
    if not _ext.has_extension():
        return False
    return device == "cpu" or bool(_ext._C.with_cuda)


def require_cuda_ext() -> None:
    if not (_ext.has_extension() and _ext._C.with_cuda):
        pytest.skip("torch_rankone._C was built without CUDA")


# --------------------------------------------------------------------------------------------
# 1. lowrank_solve_update: the applied flag
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [[], [(0,), (0, 3)]], ids=["no tensors", "empty tensors"])
@pytest.mark.parametrize(
    "c, lr", [(1.0, 0.1), (1.0, NAN), (1.0, INF), (0.0, 0.1), (INF, 0.1), (NAN, 0.1)]
)
def test_applied_flag_with_nothing_to_update_agrees_everywhere(device, shapes, c, lr):
    """With no element to update the k×k solve still decides: ``lr = NaN`` vetoes the step and
    ``c ∈ {0, inf, NaN}`` fails the solve, on the CPU op, the CUDA op and the reference alike."""
    expected = c == 1.0 and lr == 0.1
    k = 2
    C = torch.eye(k, dtype=F64)
    g = [torch.zeros(s, device=device) for s in shapes]
    U = [[torch.zeros(s, device=device) for s in shapes] for _ in range(k)]
    params = [torch.zeros(s, device=device) for s in shapes]
    assert bool(_ext.lowrank_solve_update_reference(params, g, U, C, c, lr)) == expected
    if not compiled_op_on(device):
        return
    # with no tensors at all the op runs on C's device
    C_arg = C if shapes else C.to(device)
    for scalar_device in {"cpu", device}:  # c and lr read on the host, or by the kernels
        c_t = torch.tensor(c, dtype=F64, device=scalar_device)
        lr_t = torch.tensor(lr, dtype=F64, device=scalar_device)
        applied = ops.lowrank_solve_update(params, g, flat(U), C_arg, c_t, lr_t)
        assert applied.dtype == torch.bool and applied.dim() == 0
        assert applied.device.type == device
        assert bool(applied) == expected, (scalar_device, c, lr)


@pytest.mark.parametrize("device", DEVICES)
def test_applied_flag_tests_each_value_not_their_sum(device):
    """``a = −0.85e308`` and ``scale = −lr/c = −1.7e308`` are both finite, so the update pass
    runs (here it overflows to inf), and ``applied`` must say so; ``isfinite(a₀ + scale)`` would
    have said False (the sum overflows) while the parameters changed."""
    g = [torch.tensor([-1.7e308], dtype=F64, device=device)]
    U = [[torch.ones(1, dtype=F64, device=device)]]
    C = torch.eye(1, dtype=F64)
    p_ref = [torch.zeros(1, dtype=F64, device=device)]
    assert bool(_ext.lowrank_solve_update_reference(p_ref, g, U, C, 1.0, 1.7e308))
    assert torch.isinf(p_ref[0]).all()
    if not compiled_op_on(device):
        return
    params = [torch.zeros(1, dtype=F64, device=device)]
    one, lr = torch.tensor(1.0, dtype=F64), torch.tensor(1.7e308, dtype=F64)
    applied = ops.lowrank_solve_update(params, g, flat(U), C, one, lr)
    assert bool(applied)
    assert torch.equal(params[0], p_ref[0])


def test_both_implementations_test_the_same_condition():
    """One predicate (``update_applies``: every coefficient and the scale finite) decides the
    CPU update, and on CUDA the update pass and the returned flag read its one stored result."""
    common = (ROOT / "csrc" / "common.h").read_text()
    cpu = (ROOT / "csrc" / "cpu" / "ops_cpu.cpp").read_text()
    cuda = (ROOT / "csrc" / "cuda" / "ops_cuda.cu").read_text()
    assert "inline bool update_applies(int k, const double* coefs)" in common
    assert "update_applies(k, coefs)" in cpu
    assert "coefs[K + 1] = update_applies(K, coefs) ? 1.0 : 0.0;" in cuda
    assert "if (InPlace && coefs[K + 1] == 0.0) return;" in cuda
    assert "return coefs.select(0, prob.k + 1).ne(0.0);" in cuda
    assert "a0 + scale" not in cuda and "coefs.narrow(0, prob.k, 1)" not in cuda


# --------------------------------------------------------------------------------------------
# 2. gathered_outer_accumulate: indices out of range
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "transposed"], ids=["op", "reference"])
@pytest.mark.parametrize("check_indices", [None, True])
@pytest.mark.parametrize("idx", [[0, 6], torch.tensor([-1, 0])], ids=["list", "tensor"])
def test_out_of_range_index_raises_index_error_before_anything_runs(layout, check_indices, idx):
    H = torch.zeros(4, 4, dtype=F64)
    H = H if layout == "contiguous" else H.T  # a non-contiguous H goes to the reference
    A = torch.ones(6, 4, dtype=F64)
    with pytest.raises(IndexError, match=r"idx must lie in \[0, 6\) \(the rows of A\)"):
        _ext.gathered_outer_accumulate(H, A, idx, 1.0, check_indices=check_indices)
    assert not H.any()


def test_index_check_runs_only_where_it_is_free(monkeypatch):
    """Host indices are checked by default; indices on another device (here ``meta``, standing
    in for a GPU) only with ``check_indices=True``, since reading them back is a host sync."""
    seen = []
    monkeypatch.setattr(_ext, "_check_index_range", lambda idx, rows: seen.append(idx.device.type))
    A = torch.ones(6, 4, dtype=F64)
    _ext.gathered_outer_accumulate(torch.zeros(4, 4, dtype=F64), A, [0, 5], 1.0)
    _ext.gathered_outer_accumulate(torch.zeros(4, 4, dtype=F64), A, torch.tensor([1]), 1.0)
    assert seen == ["cpu", "cpu"]
    _ext.gathered_outer_accumulate(
        torch.zeros(4, 4, dtype=F64), A, torch.tensor([1]), 1.0, check_indices=False
    )
    assert seen == ["cpu", "cpu"]
    meta = dict(dtype=F64, device="meta")
    H, A_meta = torch.zeros(4, 4, **meta), torch.ones(6, 4, **meta)
    idx = torch.tensor([0, 5], device="meta")
    _ext.gathered_outer_accumulate(H, A_meta, idx, 1.0)
    assert seen == ["cpu", "cpu"]
    _ext.gathered_outer_accumulate(H, A_meta, idx, 1.0, check_indices=True)
    assert seen == ["cpu", "cpu", "meta"]


@pytest.mark.cuda
@needs_cuda
def test_cuda_out_of_range_index_raises_and_leaves_the_context_usable():
    """Host indices for a GPU ``H`` are checked before the copy (no sync, no launch), device
    indices with ``check_indices=True``; afterwards the device still works."""
    H = torch.zeros(70, 70, dtype=F64, device="cuda")
    A = torch.randn(20, 70, dtype=F64, device="cuda")
    for idx in ([0, 20], torch.tensor([3, -1])):
        with pytest.raises(IndexError, match=r"idx must lie in \[0, 20\)"):
            _ext.gathered_outer_accumulate(H, A, idx, 1.0)
    with pytest.raises(IndexError, match=r"got values in \[0, 25\]"):
        _ext.gathered_outer_accumulate(
            H, A, torch.tensor([0, 25], device="cuda"), 1.0, check_indices=True
        )
    torch.cuda.synchronize()
    assert not H.any()
    idx = torch.tensor([1, 1, 19], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:  # device indices are not read back by default
        _ext.gathered_outer_accumulate(H, A, idx, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rows = A[idx]
    torch.testing.assert_close(H, 0.5 * rows.T @ rows, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 3. gram_kernel: __launch_bounds__
# --------------------------------------------------------------------------------------------


def test_gram_kernel_declares_launch_bounds_with_min_blocks():
    """``__launch_bounds__(kThreads, gram_min_blocks(K))`` on the Gram pass, with two or more
    blocks per SM for k ≥ 6 (a cap of 65536 / (256 · 2) = 128 registers per thread) and caps
    every k can meet (≥ 32 registers)."""
    src = (ROOT / "csrc" / "cuda" / "ops_cuda.cu").read_text()
    threads = int(re.search(r"constexpr int kThreads = (\d+);", src).group(1))
    assert re.search(
        r"__global__ void __launch_bounds__\(kThreads, gram_min_blocks\(K\)\)\s*gram_kernel\(", src
    )
    table = re.search(r"constexpr int blocks\[kMaxRank\] = \{([^}]*)\};", src)
    blocks = [int(b) for b in table.group(1).split(",")]
    assert len(blocks) == _ext.MAX_RANK
    assert all(b >= 2 for b in blocks[5:])
    assert all(b * threads <= 2048 and 65536 // (b * threads) >= 32 for b in blocks)


# --------------------------------------------------------------------------------------------
# 4. CUDA-graph capture
# --------------------------------------------------------------------------------------------


def test_capture_check_refuses_only_cuda_under_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        _ext._check_not_capturing(torch.device("cuda", 0), "lowrank_solve_update")
    _ext._check_not_capturing(torch.device("cpu"), "lowrank_solve_update")  # never captured
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _ext._check_not_capturing(torch.device("cuda", 0), "lowrank_solve_update")


@pytest.mark.skipif(not _ext.has_extension(), reason="torch_rankone._C is not built")
def test_lowrank_ops_check_for_capture_before_calling_the_op(monkeypatch):
    calls = []

    def refuse(device, op):
        calls.append((device.type, op))
        raise RuntimeError("captured")

    monkeypatch.setattr(_ext, "_check_not_capturing", refuse)
    g, U = [torch.ones(3)], [[torch.ones(3)]]
    with pytest.raises(RuntimeError, match="captured"):
        _ext.lowrank_solve(g, U, torch.eye(1), 1.0)
    params = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="captured"):
        _ext.lowrank_solve_update(params, g, U, torch.eye(1), 1.0, 0.1)
    assert calls == [("cpu", "lowrank_solve"), ("cpu", "lowrank_solve_update")]
    assert not params[0].any()


@pytest.mark.cuda
@needs_cuda
def test_cuda_lowrank_ops_refuse_graph_capture():
    """Under capture: a clear error from ``_ext`` and from the C++ op itself; the gathered
    outer product (pointers passed as kernel arguments) captures and replays correctly."""
    require_cuda_ext()
    g = [torch.randn(100, device="cuda")]
    U = [[torch.randn(100, device="cuda")]]
    params = [torch.zeros(100, device="cuda")]
    C, one = torch.eye(1, dtype=F64), torch.tensor(1.0, dtype=F64)
    _ext.lowrank_solve_update(params, g, U, C, 1.0, 0.1)  # warm-up outside the capture
    for call in (
        lambda: _ext.lowrank_solve_update(params, g, U, C, 1.0, 0.1),
        lambda: _ext.lowrank_solve(g, U, C, 1.0),
        lambda: ops.lowrank_solve_update(params, g, flat(U), C, one, one),
        lambda: ops.lowrank_solve(g, flat(U), C, one),
    ):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(graph):
                call()
    H = torch.zeros(70, 70, device="cuda")
    A = torch.randn(20, 70, device="cuda")
    idx = torch.tensor([2, 7, 7], device="cuda")
    coef = torch.ones(3, device="cuda")
    _ext.gathered_outer_accumulate(H, A, idx, coef)  # warm-up
    H.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _ext.gathered_outer_accumulate(H, A, idx, coef)
    H.zero_()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    rows = A[idx]
    torch.testing.assert_close(H, 2 * rows.T @ rows, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 5. ADIANA's coin on the generator's device
# --------------------------------------------------------------------------------------------


def _glm(device="cpu", nodes=4, rows=10, d=5):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(nodes * rows, d, generator=gen, dtype=F64)
    b = torch.where(torch.rand(nodes * rows, generator=gen) < 0.5, -1.0, 1.0).double()
    return torch.zeros(d, dtype=F64, device=device), A.to(device), b.to(device)


def test_adiana_draws_on_the_generators_device(monkeypatch):
    """Every draw the compressed-gradient baselines make with their generator names the
    generator's device (a CUDA generator cannot draw on the CPU); ADIANA's coin included."""
    real_rand, draws = torch.rand, []

    def rand(*args, generator=None, device=None, **kw):
        if generator is not None:
            draws.append((torch.device(device) if device is not None else None, generator))
        return real_rand(*args, generator=generator, device=device, **kw)

    for cls in (bl.DCGD, bl.DIANA, bl.ADIANA):
        x, A, b = _glm()
        gen = torch.Generator().manual_seed(1)
        monkeypatch.setattr(torch, "rand", rand)
        opt = cls([x], A, b, compressor=RandK(2), num_nodes=4, generator=gen)
        for _ in range(3):
            opt.step()
        monkeypatch.setattr(torch, "rand", real_rand)
    assert len(draws) >= 3 * (1 + 1 + 3)  # ADIANA: two messages and the coin per step
    assert all(device == gen.device for device, gen in draws)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("features_on", ["cpu", "cuda"])
def test_cuda_adiana_with_a_cuda_generator(features_on):
    x, A, b = _glm(features_on)
    gen = torch.Generator(device="cuda").manual_seed(1)
    opt = bl.ADIANA([x], A, b, compressor=RandK(2), num_nodes=4, generator=gen)
    losses = [float(opt.step()) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert opt.state[x]["w"].device == x.device


# --------------------------------------------------------------------------------------------
# 6. No host synchronisation in an ordinary CUDA step
# --------------------------------------------------------------------------------------------


def _rank_one_default(model, generator):
    return RankOneNewton(model.parameters(), lr=1e-3, generator=generator)


def _rank_one_isotropic(model, generator):
    return RankOneNewton(
        model.parameters(), lr=1e-3, damping=10.0, damping_mode="fixed",
        preconditioner="isotropic", generator=generator,
    )  # fmt: skip


def _neumann_fixed(model, generator):
    return NeumannIHVP(
        model.parameters(), lr=0.5, damping=1e-2, damping_mode="fixed", scale=50.0,
        num_terms=5, generator=generator,
    )  # fmt: skip


def _fisher_default(model, generator):
    return FisherNewton(model.parameters(), module=model, momentum=0.5, generator=generator)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "make, generator",
    [
        (_rank_one_default, "cuda"),
        (_rank_one_isotropic, "cuda"),
        (_neumann_fixed, "cuda"),
        (_rank_one_isotropic, "owned"),
        (_rank_one_isotropic, "cpu"),
        (_fisher_default, "owned"),
    ],
    ids=["RankOneNewton default", "RankOneNewton isotropic", "NeumannIHVP fixed scale",
         "RankOneNewton isotropic, owned generator", "RankOneNewton isotropic, CPU generator",
         "FisherNewton default"],
)  # fmt: skip
def test_cuda_steps_do_not_synchronise_between_sync_points(make, generator):
    """Calls 3 and 5–7 (not sync points of ``_check_health``: those are 1, 2, 4, 8, …) run
    under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    ).cuda()
    X, y = torch.randn(128, 32, device="cuda"), torch.randn(128, 1, device="cuda")
    # owned: on the parameters' device; a CPU generator's draws are copied without blocking
    gen = None if generator == "owned" else torch.Generator(device=generator).manual_seed(0)
    opt = make(model, gen)

    def loss():
        if make is _fisher_default:  # per-sample losses
            return torch.nn.functional.mse_loss(model(X), y, reduction="none").mean(dim=1)
        return torch.nn.functional.mse_loss(model(X), y)

    for call in range(1, 8):
        if call in (3, 5, 6, 7):
            assert not opt._is_sync_point(call)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step(loss)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        else:
            opt.step(loss)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(opt.global_state["step"]) >= 1
