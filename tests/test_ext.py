"""The compiled kernels (``csrc/``, SPEC §5) against the float64 references of ``_ext``.

Every comparison recomputes the reference in float64 from the same (possibly float32) inputs:
the kernels sum in float64 and round once, so they must match it to 1e-12 (float64) or 1e-5
(float32) relative to the size of the result. CPU tests run both CPU variants (AVX2+FMA and the
baseline build) where the CPU has AVX2; ``cuda`` tests are skipped without a GPU; the nvcc build
check compiles the CUDA sources wherever nvcc is found.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_rankone import _ext

ROOT = Path(__file__).resolve().parents[1]
F32, F64 = torch.float32, torch.float64
TOL = {F64: 1e-12, F32: 1e-5}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# () and (1,) are 0-d/1-element, 7 leaves a vector tail, 40_000 spans several chunks.
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (1000,), (40_000,)]

needs_ext = pytest.mark.skipif(
    not _ext.has_extension(),
    reason="torch_rankone._C is not built (pip install --no-build-isolation -e .)",
)
ops = torch.ops.torch_rankone


def _isas() -> list[str]:
    if not _ext.has_extension():
        return ["baseline"]
    try:
        _ext._C.set_cpu_isa("avx2")
        return ["baseline", "avx2"]
    except ValueError:
        return ["baseline"]
    finally:
        _ext._C.set_cpu_isa("auto")


@pytest.fixture(params=_isas())
def isa(request):
    """Run the CPU kernels of one instruction-set variant (no effect on CUDA)."""
    _ext._C.set_cpu_isa(request.param)
    yield request.param
    _ext._C.set_cpu_isa("auto")


def assert_close(actual, expected, tol: float) -> None:
    """``|actual − expected| ≤ tol · max|expected|`` for lists of tensors, over all entries."""
    actual = [actual] if isinstance(actual, torch.Tensor) else actual
    expected = [expected] if isinstance(expected, torch.Tensor) else expected
    assert [a.shape for a in actual] == [e.shape for e in expected]
    scale = max((float(e.abs().max()) for e in expected if e.numel()), default=0.0)
    for a, e in zip(actual, expected):
        err = float((a.double().cpu() - e.double().cpu()).abs().max()) if e.numel() else 0.0
        assert err <= tol * scale, (err, scale)


def make_problem(shapes, k, dtype, device, seed=0):
    """``g``, ``U`` (k columns) and a positive semi-definite ``C`` with entries ~ 1/N, so that
    ``c·I + C UᵀU`` (eigenvalues ≥ c, of order 1) is well conditioned for the comparisons."""
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    U = [[torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes] for _ in range(k)]
    n = max(sum(torch.Size(s).numel() for s in shapes), 1)
    B = torch.randn(k, k, generator=gen, dtype=F64)
    return g, U, B @ B.T / (k * n)


def to64(xs):
    return [x.double() for x in xs]


def reference(g, U, C, c):
    return _ext.lowrank_solve_reference(to64(g), [to64(u) for u in U], C, c)


def flat(U):
    return [t for u in U for t in u]


def scalar(x):
    return torch.tensor(x, dtype=F64)


# --------------------------------------------------------------------------------------------
# lowrank_solve / lowrank_solve_update
# --------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k", range(1, 9))
def test_lowrank_solve_matches_reference(device, dtype, k, isa):
    g, U, C = make_problem(SHAPES, k, dtype, device, seed=k)
    y = ops.lowrank_solve(g, flat(U), C, scalar(1.5))
    assert all(t.dtype == dtype and t.device.type == device for t in y)
    assert_close(y, reference(g, U, C, 1.5), TOL[dtype])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_lowrank_solve_update_matches_reference(device, dtype, k, isa):
    g, U, C = make_problem(SHAPES, k, dtype, device, seed=10 + k)
    params = [torch.randn(s, dtype=dtype).to(device) for s in SHAPES]
    expected = [p.double() - 0.3 * y for p, y in zip(params, reference(g, U, C, 0.7))]
    assert ops.lowrank_solve_update(params, g, flat(U), C, scalar(0.7), scalar(0.3))
    assert_close(params, expected, TOL[dtype])


@needs_ext
def test_rank_one_newton_system():
    """RankOneNewton's indefinite-looking C = (N/2)[[0,1],[1,0]] with U = [h, u] (SPEC §4.1)."""
    n = 1500
    u = torch.randn(n, dtype=F64)
    u /= u.norm()
    h = torch.randn(n, dtype=F64) * 1e-3
    g = torch.randn(n, dtype=F64)
    C = (n / 2) * torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    c = 1.0 + (n / 2) * float(h.norm())  # the safeguarded damping: positive definite
    y = ops.lowrank_solve([g], [h, u], C, scalar(c))[0]
    M = c * torch.eye(n, dtype=F64) + (n / 2) * (torch.outer(h, u) + torch.outer(u, h))
    assert_close(y, torch.linalg.solve(M, g), 1e-10)


@needs_ext
@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), max_size=3).map(tuple), min_size=1, max_size=6),
    k=st.integers(1, 8),
    dtype=st.sampled_from([F32, F64]),
)
def test_lowrank_solve_any_shapes(shapes, k, dtype):
    g, U, C = make_problem(shapes, k, dtype, "cpu")
    assert_close(ops.lowrank_solve(g, flat(U), C, scalar(2.0)), reference(g, U, C, 2.0), TOL[dtype])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_non_contiguous_inputs_and_params(device):
    base = torch.randn(6, 8, dtype=F64, device=device)
    g = [base.T, torch.randn(10, dtype=F64, device=device)[::2]]  # transposed, strided
    U = [[torch.randn(6, 8, dtype=F64, device=device).T, torch.randn(5, dtype=F64, device=device)]]
    C = torch.ones(1, 1, dtype=F64) / 50
    params = [
        torch.randn(6, 8, dtype=F64, device=device).T,
        torch.randn(5, 2, dtype=F64, device=device)[:, 0],
    ]
    conv = torch.randn(2, 3, 4, 5, dtype=F64, device=device).to(memory_format=torch.channels_last)
    g.append(torch.randn_like(conv))  # channels_last gradient of a channels_last weight
    U[0].append(torch.randn(2, 3, 4, 5, dtype=F64, device=device))
    params.append(conv)
    assert not any(p.is_contiguous() for p in params[:2]) and not conv.is_contiguous()
    expected = [p.double() - 0.5 * y for p, y in zip(params, reference(g, U, C, 1.0))]
    ops.lowrank_solve_update(params, g, flat(U), C, scalar(1.0), scalar(0.5))
    assert_close(params, expected, 1e-12)
    assert_close(ops.lowrank_solve(g, flat(U), C, scalar(1.0)), reference(g, U, C, 1.0), 1e-12)


@needs_ext
def test_lowrank_sums_do_not_depend_on_threads():
    """Partial sums are per fixed-size chunk and added in chunk order: bitwise reproducible."""
    g, U, C = make_problem([(300_000,), (1000,)], 3, F32, "cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(ops.lowrank_solve(g, flat(U), C, scalar(1.0)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_ext
def test_lowrank_scalars_as_tensors_of_any_float_dtype():
    g, U, C = make_problem([(50,)], 2, F32, "cpu")
    y = ops.lowrank_solve(g, flat(U), C.float(), torch.tensor(1.5, dtype=F32))
    assert_close(y, reference(g, U, C.float().double(), 1.5), 1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["singular", "nan_in_g", "inf_in_u", "c_inf", "c_nan", "c_zero"])
def test_lowrank_nonfinite_or_singular_gives_nonfinite(device, case):
    """A failed solve yields NaN/inf everywhere it matters, never plausible finite numbers."""
    g, U, C = make_problem([(4, 5), (7,)], 2, F64, device)
    c = 1.0
    if case == "singular":  # c = 0 and C = diag(1, 0): c·I + C G has an exactly zero row
        c, C = 0.0, torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    elif case == "nan_in_g":
        g[1][3] = float("nan")
    elif case == "inf_in_u":
        U[1][0][0, 0] = float("inf")
    elif case in ("c_inf", "c_nan"):
        c = float(case[2:])
    else:  # c = 0 and C = 0: the operator is zero
        c, C = 0.0, torch.zeros(2, 2, dtype=F64)
    y = ops.lowrank_solve(g, flat(U), C, scalar(c))
    assert not any(torch.isfinite(t).any() for t in y), y
    a = _ext.lowrank_coefficients(*_ext.lowrank_gram(g, U), C, c)
    assert not torch.isfinite(a).any()  # the reference agrees
    # in place: nothing is written, and the op says so (both implementations)
    for update in (ops.lowrank_solve_update, _ext.lowrank_solve_update_reference):
        params = [torch.randn_like(t) for t in g]
        before = [p.clone() for p in params]
        U_arg = flat(U) if update is ops.lowrank_solve_update else U
        applied = update(params, g, U_arg, C, scalar(c), scalar(0.1))
        assert applied.dtype == torch.bool and applied.device.type == device
        assert not applied
        assert all(torch.equal(p, b) for p, b in zip(params, before))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.1])
def test_lowrank_update_vetoed_by_non_finite_lr(device, lr):
    """``lr = NaN`` (how an optimizer vetoes a step on device) leaves params untouched."""
    g, U, C = make_problem([(4, 5), (7,)], 2, F64, device)
    for update, U_arg in (
        (ops.lowrank_solve_update, flat(U)),
        (_ext.lowrank_solve_update_reference, U),
    ):
        params = [torch.randn_like(t) for t in g]
        before = [p.clone() for p in params]
        applied = update(params, g, U_arg, C, scalar(1.0), torch.tensor(lr, device=device))
        assert bool(applied) == (lr == 0.1)
        assert all(torch.equal(p, b) for p, b in zip(params, before)) == (lr != 0.1)


@needs_ext
def test_lowrank_empty_inputs():
    C = torch.eye(2, dtype=F64)
    assert ops.lowrank_solve([], [], C, scalar(1.0)) == []
    empty = [torch.zeros(0), torch.zeros(0, 3)]
    y = ops.lowrank_solve(empty, empty + empty, C, scalar(1.0))
    assert [t.shape for t in y] == [(0,), (0, 3)]


@needs_ext
def test_lowrank_update_bumps_version_and_refuses_autograd():
    p = torch.zeros(3)
    version = p._version
    ops.lowrank_solve_update(
        [p], [torch.ones(3)], [torch.ones(3)], torch.eye(1), scalar(1.0), scalar(1.0)
    )
    assert p._version > version
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"params\[0\] requires grad.*torch.no_grad"):
        ops.lowrank_solve_update(
            [w], [torch.ones(3)], [torch.ones(3)], torch.eye(1), scalar(1.0), scalar(1.0)
        )
    with torch.no_grad():
        ops.lowrank_solve_update(
            [w], [torch.ones(3)], [torch.ones(3)], torch.eye(1), scalar(1.0), scalar(1.0)
        )


@needs_ext
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(C=torch.eye(9, dtype=F64)), ValueError, r"rank k = C.size\(0\)"),
        (lambda a: a.update(C=torch.ones(2, 3)), ValueError, "square k×k"),
        (lambda a: a.update(C=torch.eye(2, dtype=torch.int64)), TypeError, "C must have a float"),
        (lambda a: a.update(U=a["U"][:-1]), ValueError, r"U has 3 tensors, expected k·n = 2·2"),
        (
            lambda a: a["U"].__setitem__(3, torch.zeros(4)),
            ValueError,
            r"U\[1\]\[1\] has shape \[4\] but g\[1\] has shape \[5\]",
        ),
        (
            lambda a: a["U"].__setitem__(2, a["U"][2].double()),
            TypeError,
            r"U\[1\]\[0\] has dtype Double but g\[0\] has Float",
        ),
        (lambda a: a.update(g=[t.half() for t in a["g"]]), TypeError, "float32 and float64"),
        (lambda a: a.update(c=torch.ones(1)), ValueError, "c must be a 0-d tensor"),
        (lambda a: a.update(lr=torch.tensor(1)), TypeError, "lr must have a floating dtype"),
        (lambda a: a.update(params=a["params"][:1]), ValueError, "params has 1 tensors but g"),
        (
            lambda a: a["params"].__setitem__(0, torch.zeros(3, 4, dtype=F64)),
            TypeError,
            r"params\[0\] has dtype Double",
        ),
    ],
)
def test_lowrank_bad_inputs_raise_clear_errors(mutate, error, match):
    args = {
        "params": [torch.zeros(3, 4), torch.zeros(5)],
        "g": [torch.ones(3, 4), torch.ones(5)],
        "U": [torch.ones(3, 4), torch.ones(5), torch.ones(3, 4), torch.ones(5)],
        "C": torch.eye(2, dtype=F64),
        "c": scalar(1.0),
        "lr": scalar(0.1),
    }
    mutate(args)
    with pytest.raises(error, match=match):
        ops.lowrank_solve_update(*args.values())


# --------------------------------------------------------------------------------------------
# Dispatch from _ext (the one place callers go through)
# --------------------------------------------------------------------------------------------


def _forbid(monkeypatch, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} should not be called")

    monkeypatch.setattr(_ext, name, fail)


@needs_ext
def test_ext_dispatches_to_the_ops(monkeypatch):
    g, U, C = make_problem([(3, 4), (5,)], 2, F32, "cpu")
    y_ref = reference(g, U, C, 2.0)
    _forbid(monkeypatch, "lowrank_solve_reference")
    _forbid(monkeypatch, "lowrank_solve_update_reference")
    _forbid(monkeypatch, "gathered_outer_accumulate_reference")
    y = _ext.lowrank_solve(g, U, C, 2.0)  # Python floats for c and lr
    assert_close(y, y_ref, 1e-5)
    params = [torch.zeros_like(t) for t in g]
    _ext.lowrank_solve_update(params, g, U, C, 2.0, torch.tensor(0.5))
    assert_close(params, [-0.5 * t for t in y_ref], 1e-5)
    H = torch.zeros(4, 4, dtype=F64)
    A = torch.randn(6, 4, dtype=F64)
    _ext.gathered_outer_accumulate(H, A, [1, 1, 5], 0.5)  # lists and a shared coefficient
    assert_close(H, 0.5 * (2 * torch.outer(A[1], A[1]) + torch.outer(A[5], A[5])), 1e-12)


@needs_ext
@pytest.mark.parametrize(
    "case", ["float16", "rank 9", "mixed dtypes", "needs grad", "H not contiguous"]
)
def test_ext_falls_back_to_the_references(monkeypatch, case):
    for name in ("lowrank_solve", "lowrank_solve_update", "gathered_outer_accumulate"):
        monkeypatch.setattr(ops, name, None, raising=False)  # calling the op would fail
    if case == "H not contiguous":
        H = torch.zeros(5, 5, dtype=F64).T
        A = torch.randn(3, 5, dtype=F64)
        _ext.gathered_outer_accumulate(H, A, torch.tensor([0, 2]), torch.ones(2, dtype=F64))
        assert_close(H, torch.outer(A[0], A[0]) + torch.outer(A[2], A[2]), 1e-12)
        return
    k = 9 if case == "rank 9" else 2
    dtype = torch.float16 if case == "float16" else F32
    g, U, C = make_problem([(3,), (4,)], k, dtype, "cpu")
    if case == "mixed dtypes":
        g[1] = g[1].double()
    if case == "needs grad":
        g[0].requires_grad_()
    y = _ext.lowrank_solve(g, U, C, 3.0)
    with torch.no_grad():
        assert_close(y, reference(g, U, C, 3.0), 1e-2 if dtype == torch.float16 else 1e-5)


@needs_ext
def test_has_extension_and_loading_messages():
    """One warning (with the build command) when _C cannot load; none when disabled."""
    code = (
        "import sys, warnings\n"
        "if sys.argv[1] == 'missing': sys.modules['torch_rankone._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, torch_rankone\n"
        "    from torch_rankone import _ext\n"
        "    y = _ext.lowrank_solve([torch.ones(3)], [[torch.ones(3)]], torch.eye(1), 1.0)\n"
        "mine = [str(x.message) for x in w if 'torch_rankone' in str(x.message)]\n"
        "print(torch_rankone.has_extension(), len(mine), mine[0] if mine else '')\n"
    )
    env = dict(os.environ)
    env.pop("TORCH_RANKONE_DISABLE_EXT", None)

    def run(mode, **extra):
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return out.stdout.strip()

    assert run("normal") == "True 0"
    assert run("normal", TORCH_RANKONE_DISABLE_EXT="1") == "False 0"
    has, count, message = run("missing").split(" ", 2)
    assert (has, count) == ("False", "1")
    assert "pip install --no-build-isolation -e ." in message
    assert "TORCH_RANKONE_DISABLE_EXT=1" in message


@needs_ext
def test_ops_pass_torch_library_opcheck():
    """Schema (mutation annotations), fake tensors and AOT dispatch are consistent."""
    g, U, C = make_problem([(3, 4), (5,)], 2, F32, "cpu")
    params = [torch.zeros_like(t) for t in g]
    torch.library.opcheck(ops.lowrank_solve, (g, flat(U), C, scalar(1.0)))
    torch.library.opcheck(
        ops.lowrank_solve_update, (params, g, flat(U), C, scalar(1.0), scalar(0.1))
    )
    H, A = torch.randn(4, 4), torch.randn(6, 4)
    torch.library.opcheck(
        ops.gathered_outer_accumulate, (H, A, torch.tensor([0, 5]), torch.ones(2))
    )


# --------------------------------------------------------------------------------------------
# gathered_outer_accumulate
# --------------------------------------------------------------------------------------------


def outer_reference(H, A, idx, coef):
    return H.double() + (A.double()[idx].T * coef.double()) @ A.double()[idx]


def outer_scale(H, A, idx, coef):
    """Entry-wise size of the terms, for a tolerance that survives cancelling coefficients."""
    rows = A.double()[idx].abs()
    return H.double().abs() + (rows.T * coef.double().abs()) @ rows


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("d", [1, 5, 96, 97, 300])
@pytest.mark.parametrize("t", [0, 1, 7, 130, 300])
def test_gathered_outer_matches_reference(device, dtype, d, t, isa):
    gen = torch.Generator().manual_seed(d * 1000 + t)
    n = 40  # few rows: the indices repeat
    H = torch.randn(d, d, generator=gen, dtype=dtype).to(device)  # not symmetric on purpose
    A = torch.randn(n, d, generator=gen, dtype=dtype).to(device)
    idx = torch.randint(0, n, (t,), generator=gen).to(device)
    coef = torch.randn(t, generator=gen, dtype=dtype).to(device)  # mixed signs
    expected = outer_reference(H, A, idx, coef)
    scale = outer_scale(H, A, idx, coef)
    ops.gathered_outer_accumulate(H, A, idx, coef)
    err = (H.double() - expected).abs() / scale.clamp_min(1e-300)
    assert float(err.max()) <= TOL[dtype]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_gathered_outer_strided_A_and_symmetry(device):
    A = torch.randn(50, 130, dtype=F64, device=device)
    idx = torch.tensor([3, 3, 49, 0], device=device)
    coef = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=F64, device=device)
    for view in (A[:, 10:110], A[:, :100].T.contiguous().T):  # row stride > d; column-major
        H = torch.zeros(100, 100, dtype=F64, device=device)
        ops.gathered_outer_accumulate(H, view, idx, coef)
        assert_close(H, outer_reference(torch.zeros_like(H), view, idx, coef), 1e-12)
        assert torch.equal(H, H.T)  # the two halves get bitwise the same increments


@needs_ext
def test_gathered_outer_empty_index_list_changes_nothing():
    H = torch.randn(10, 10)
    before = H.clone()
    ops.gathered_outer_accumulate(
        H, torch.randn(4, 10), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    )
    assert torch.equal(H, before)


@needs_ext
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(idx=torch.tensor([0, 6])), IndexError, r"idx must lie in \[0, 6\)"),
        (lambda a: a.update(idx=torch.tensor([-1, 0])), IndexError, r"got values in \[-1, 0\]"),
        (lambda a: a.update(idx=torch.tensor([0.0, 1.0])), TypeError, "idx must have dtype int64"),
        (lambda a: a.update(coef=torch.ones(3)), ValueError, r"one entry per index \(2\)"),
        (lambda a: a.update(A=torch.ones(6, 5)), ValueError, "A must be an n×d matrix with d = 4"),
        (lambda a: a.update(H=torch.zeros(4, 3)), ValueError, "H must be a square"),
        (lambda a: a.update(H=torch.zeros(8, 4)[::2]), ValueError, "H must be contiguous"),
        (lambda a: a.update(A=a["A"].double()), TypeError, "A has dtype Double but H has Float"),
        (lambda a: a.update(H=torch.zeros(4, 4, dtype=torch.int32)), TypeError, "float32 and"),
    ],
)
def test_gathered_outer_bad_inputs_raise_clear_errors(mutate, error, match):
    args = {
        "H": torch.zeros(4, 4),
        "A": torch.ones(6, 4),
        "idx": torch.tensor([0, 5]),
        "coef": torch.ones(2),
    }
    mutate(args)
    with pytest.raises(error, match=match):
        ops.gathered_outer_accumulate(*args.values())


# --------------------------------------------------------------------------------------------
# CUDA: host synchronisation, and the nvcc build check
# --------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.cuda
def test_cuda_ops_do_not_synchronise():
    """Device scalars, a CPU ``C`` and Python floats via _ext: no host sync anywhere."""
    if not _ext._C.with_cuda:
        pytest.skip("torch_rankone._C was built without CUDA")
    g, U, C = make_problem([(100, 10), (33,)], 3, F32, "cuda")
    params = [torch.zeros_like(t) for t in g]
    c, lr = torch.tensor(2.0, device="cuda"), torch.tensor(0.1, device="cuda")
    H = torch.zeros(70, 70, device="cuda")
    A, idx = torch.randn(20, 70, device="cuda"), torch.randint(0, 20, (9,), device="cuda")
    coef = torch.randn(9, device="cuda")
    C_cuda = C.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.lowrank_solve_update(params, g, flat(U), C, c, lr)
        ops.lowrank_solve_update(params, g, flat(U), C_cuda, c, lr)
        ops.lowrank_solve(g, flat(U), C, c)
        ops.gathered_outer_accumulate(H, A, idx, coef)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = [-0.2 * y for y in reference(g, U, C, 2.0)]
    assert_close(params, expected, 1e-5)


def _load_setup():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="torch_rankone_setup")


@pytest.mark.slow
@pytest.mark.parametrize("source", _load_setup()["CUDA_SOURCES"])
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    """Build check for machines without a GPU: ``nvcc -c`` of each .cu file with the flags of
    ``CUDAExtension``, against this torch's headers (CPU wheels ship ATen/c10 CUDA headers; the
    one generated file they lack is skipped by a define, see setup.nvcc_compile_command).

    Covers: syntax, templates and every kernel instantiation, device/host annotations, the
    headers. Not covered: linking against libtorch_cuda (absent from CPU wheels) and running.
    """
    setup = _load_setup()
    include = Path(torch.__file__).parent / "include"
    if not (include / "c10" / "cuda" / "CUDAStream.h").is_file():
        pytest.skip("this torch ships no c10/cuda headers")
    try:
        cmd = setup["nvcc_compile_command"](ROOT / source, tmp_path / "out.o")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


def test_setup_builds_cpp_only_without_cuda_and_adds_cuda_sources_with_it(monkeypatch):
    """setup.py: a CppExtension of the .cpp files on CPU-only torch (here, CI); the .cu files
    and the CUDA define join when torch has CUDA and nvcc is found; none with BUILD_EXT=0."""
    from torch.utils import cpp_extension

    setup = _load_setup()
    assert setup["CXX_SOURCES"] and setup["CUDA_SOURCES"]
    monkeypatch.setattr(torch.version, "cuda", None)
    [ext], cmdclass = setup["_extensions"]()
    assert ext.name == "torch_rankone._C" and "build_ext" in cmdclass
    assert sorted(ext.sources) == setup["CXX_SOURCES"]
    assert not any(s.endswith(".cu") for s in ext.sources)

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    [ext], _ = setup["_extensions"]()
    assert set(setup["CUDA_SOURCES"]) <= set(ext.sources)
    assert ("TORCH_RANKONE_WITH_CUDA", None) in ext.define_macros

    monkeypatch.setenv("TORCH_RANKONE_BUILD_EXT", "0")
    assert setup["_extensions"]() == ([], {})
