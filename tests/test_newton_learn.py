"""NewtonLearn (Islamov, Qian, Richtárik, ICML 2021) in simulated mode: dense float64 references
for NL1, NL2 and CNL steps, the invariants (NL1's projection, NL2's positive definiteness), the
exact cubic subproblem, rank-one Cholesky updates, bits accounting by hand, checkpointing, errors,
and the real-data acceptance runs on a9a and w8a (P − P* ≤ 1e-10). Faults and unusual inputs:
``tests/test_reliability_newton_learn.py``.
"""

from __future__ import annotations

import copy
import functools
import math
import time

import _glm_reference as glm_reference
import pytest
import torch
from torch.nn.functional import softplus

from torch_rankone import NewtonLearn
from torch_rankone.distributed import (
    Identity,
    ProtocolError,
    RandK,
    RandomDithering,
    TopK,
)
from torch_rankone.glm import glm_loss, glm_newton
from torch_rankone.linalg import cholesky_rank_one_update, cubic_step

LAM = 1e-3
VARIANTS_ALL = ("nl1", "nl2", "cnl")
N_NODES, M_ROWS, D = 4, 25, 6
TOL = 1e-12


# ------------------------------------------------------------------------------------------------
# A small logistic-regression problem and its dense float64 reference quantities
# ------------------------------------------------------------------------------------------------


problem = functools.partial(glm_reference.problem, rows=N_NODES * M_ROWS, d=D)
dense = functools.partial(glm_reference.dense, lam=LAM)
gram = glm_reference.gram


def solve(H, g, lam=LAM):
    return torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), g)


def param(d=D, value=0.0):
    return torch.full((d,), value, dtype=torch.float64, requires_grad=True)


def make(x, A, b, **kw):
    kw.setdefault("num_nodes", N_NODES)
    kw.setdefault("lam", LAM)
    return NewtonLearn([x], A, b, **kw)


# ------------------------------------------------------------------------------------------------
# Dense references
# ------------------------------------------------------------------------------------------------


def test_nl1_identity_is_newton_with_one_step_lagged_hessian():
    """Identity compressor, η = 1: ``h^{k+1} = h(x^k)``, so ``H^k = ∇²f(x^{k−1})`` (``H^0`` at
    ``x^0``) and NL1 is ``x^{k+1} = x^k − (∇²f(x^{k−1}) + λI)⁻¹ ∇P(x^k)``."""
    A, b = problem()
    x = param(value=0.3)
    opt = make(x, A, b, compressor=Identity(), eta=1.0)
    xr = torch.full((D,), 0.3, dtype=torch.float64)
    h_lag = dense(A, b, xr)[2]
    for k in range(8):
        P, g, h = dense(A, b, xr)
        xr = xr - solve(gram(A, h_lag), g)
        h_lag = h
        got = opt.step()
        assert torch.allclose(got, P, rtol=TOL, atol=0), k
        assert torch.allclose(x.detach(), xr, rtol=1e-11, atol=1e-13), k
    assert float(dense(A, b, xr)[1].norm()) < 1e-12  # and it converged


def _nl2_reference(A, b, x0, h0, gamma, eta, steps, gen, cubic_M=None):
    """NL2 (or CNL when ``cubic_M`` is given) from the formulas, with RandK(1) drawn from
    ``gen`` for all nodes in node order; returns the iterates."""
    x, h = x0.clone(), h0.clone().reshape(N_NODES, M_ROWS)
    Amat, B = gram(A, h.reshape(-1) + 2 * gamma), gram(A, torch.ones(len(b), dtype=A.dtype))
    out = []
    for _ in range(steps):
        _, g, hx = dense(A, b, x)
        hx = hx.reshape(N_NODES, M_ROWS)
        beta = ((hx + 2 * gamma) / (h + 2 * gamma)).max()
        Hreg = beta * Amat - 2 * gamma * B + LAM * torch.eye(D, dtype=A.dtype)
        if cubic_M is None:
            x = x - torch.linalg.solve(Hreg, g)
        else:
            x = x + _cubic_by_bisection(Hreg, g, cubic_M)
        change = eta * _randk1(hx - h, gen)
        h = h + change
        Amat = Amat + gram(A, change.reshape(-1))
        out.append(x.clone())
    return out


def _randk1(delta, gen):
    """RandK(1) from its definition: per row, the entry of the largest of ``m`` float64 uniform
    keys, scaled by ``m``."""
    keys = torch.rand(delta.shape, generator=gen, dtype=torch.float64)
    out = torch.zeros_like(delta)
    rows, cols = torch.arange(delta.shape[0]), keys.argmax(1)
    out[rows, cols] = delta[rows, cols] * delta.shape[1]
    return out


def _cubic_by_bisection(Hreg, g, M):
    """Reference cubic step for positive definite ``Hreg``: bisection on ``‖s(r)‖ = r``,
    ``s(r) = −(Hreg + (M r/2) I)⁻¹ g``, with dense solves."""
    eye = torch.eye(len(g), dtype=g.dtype)
    lo, hi = 0.0, 1.0
    while torch.linalg.solve(Hreg + M * hi / 2 * eye, g).norm() > hi:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (
            (mid, hi)
            if torch.linalg.solve(Hreg + M * mid / 2 * eye, g).norm() > mid
            else (
                lo,
                mid,
            )
        )
    return -torch.linalg.solve(Hreg + M * (lo + hi) / 4 * eye, g)


@pytest.mark.parametrize("variant", ["nl2", "cnl"])
def test_nl2_and_cnl_steps_equal_dense_reference(variant):
    """β, the 2γ shift, ``A``'s update with the RandK(1) messages, and (CNL) the cubic model's
    minimiser, against formulas written here; ``h^0`` random so that β ≠ 1."""
    A, b = problem(1)
    gamma, eta = 0.25, 0.5
    h0 = torch.rand(len(b), generator=torch.Generator().manual_seed(5), dtype=A.dtype) * gamma
    x0 = torch.linspace(-0.5, 0.5, D, dtype=A.dtype)
    M = 0.7 if variant == "cnl" else None
    x = param()
    with torch.no_grad():
        x.copy_(x0)
    opt = make(
        x,
        A,
        b,
        variant=variant,
        gamma=gamma,
        eta=eta,
        h0=h0,
        cubic_reg=M,
        generator=torch.Generator().manual_seed(11),
    )
    ref = _nl2_reference(A, b, x0, h0, gamma, eta, 4, torch.Generator().manual_seed(11), M)
    for k, xr in enumerate(ref):
        opt.step()
        assert torch.allclose(x.detach(), xr, rtol=1e-10, atol=1e-12), (k, x, xr)


def test_cnl_step_satisfies_first_order_optimality_and_default_M():
    """The CNL step ``s`` solves ``∇P + (H^k + λI) s + (M/2)‖s‖ s = 0``; the default ``M`` is
    ``ν R³`` with ``ν = 1/(6√3)`` and ``R = max‖a_ij‖``."""
    A, b = problem(2)
    x = param(value=1.0)
    opt = make(x, A, b, variant="cnl", generator=torch.Generator().manual_seed(0))
    R = float(A.norm(dim=1).max())
    assert opt.cubic_reg == pytest.approx(R**3 / (6 * math.sqrt(3)), rel=1e-14)
    state = opt.state[x]
    x0, h = x.detach().clone(), state["h"].clone()
    _, g, hx = dense(A, b, x0)
    beta = ((hx.reshape(h.shape) + 0.5) / (h + 0.5)).max()
    Hreg = beta * state["A"] - 0.5 * state["B"] + LAM * torch.eye(D, dtype=A.dtype)
    opt.step()
    s = x.detach() - x0
    residual = g + Hreg @ s + opt.cubic_reg / 2 * s.norm() * s
    assert float(residual.norm()) <= 1e-10 * float(g.norm())


# ------------------------------------------------------------------------------------------------
# The cubic subproblem and the rank-one Cholesky update
# ------------------------------------------------------------------------------------------------


def _cubic_model(H, g, M, s):
    return g.dot(s) + 0.5 * s.dot(H @ s) + M / 6 * s.norm() ** 3


@pytest.mark.parametrize("case", ["pd", "indefinite", "hard"])
def test_cubic_step_is_the_global_minimiser(case):
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    mu = torch.linspace(0.1, 3.0, 8, dtype=torch.float64)
    g = torch.randn(8, generator=gen, dtype=torch.float64)
    if case != "pd":
        mu[0] = -1.0
    if case == "hard":
        g = g - Q[:, 0] * Q[:, 0].dot(g)  # no gradient along the negative curvature
        g = g * 1e-3
    H, M = Q @ torch.diag(mu) @ Q.T, 2.0
    s = cubic_step(H, g, M)
    r = float(s.norm())
    # first- and second-order conditions of the global minimiser (Nesterov–Polyak, Thm 10)
    assert float((g + H @ s + M / 2 * r * s).norm()) <= 1e-10 * max(float(g.norm()), 1e-3)
    assert float(torch.linalg.eigvalsh(H + M * r / 2 * torch.eye(8, dtype=H.dtype))[0]) >= -1e-10
    # and no random point does better
    trial = s + 0.1 * torch.randn(2000, 8, generator=gen, dtype=torch.float64)
    best = min(float(_cubic_model(H, g, M, t)) for t in trial)
    assert float(_cubic_model(H, g, M, s)) <= best + 1e-12


def _chol(H):
    return torch.linalg.cholesky(H)


@pytest.mark.parametrize("alpha", [0.7, -0.3])
def test_cholesky_rank_one_update_and_downdate(alpha):
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    H = X @ X.T + 2 * torch.eye(12, dtype=torch.float64)
    z = torch.randn(12, generator=gen, dtype=torch.float64)
    L, ok = cholesky_rank_one_update(_chol(H), z, alpha)
    assert ok
    assert torch.allclose(L, _chol(H + alpha * torch.outer(z, z)), rtol=0, atol=1e-12)
    assert torch.equal(L, L.tril())


def test_cholesky_downdate_out_of_the_cone_is_reported():
    H = torch.eye(3, dtype=torch.float64)
    _, ok = cholesky_rank_one_update(_chol(H), torch.tensor([2.0, 0, 0], dtype=H.dtype), -1.0)
    assert not ok


def test_nl1_cholesky_update_solver_equals_refactoring():
    """``solver="cholesky_update"`` (rank-one updates and downdates of the factor, RandK(2)
    messages of both signs) gives the iterates of per-iteration refactoring."""
    A, b = problem(6)
    runs = []
    for solver in ("cholesky", "cholesky_update"):
        x = param(value=0.5)
        opt = make(
            x, A, b, compressor=RandK(2), solver=solver, generator=torch.Generator().manual_seed(2)
        )
        runs.append(torch.stack([opt.step() * 0 + x.detach() for _ in range(25)]))
        if solver == "cholesky_update":
            state = opt.state[x]
            H = state["H"] + LAM * torch.eye(D, dtype=A.dtype)
            assert torch.allclose(state["chol"] @ state["chol"].T, H, rtol=0, atol=1e-12)
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Invariants over runs with RandK(1)
# ------------------------------------------------------------------------------------------------


def test_nl1_projection_keeps_h_nonnegative():
    """η = 1 with RandK(1) overshoots (the kept entry is scaled by m), so ``h^k + η m`` goes
    negative; the projection clips it to 0 and every ``h`` stays ≥ 0."""
    A, b = problem(7)
    x = param()
    opt = make(x, A, b, eta=1.0, generator=torch.Generator().manual_seed(0))
    clipped = 0
    for _ in range(60):
        opt.step()
        h = opt.state[x]["h"]
        assert float(h.min()) >= 0.0
        clipped += int((h == 0).sum())  # φ'' > 0: only the projection makes an exact 0
    assert clipped > 0


def test_nl2_model_stays_positive_definite_and_dominates_hessian():
    """NL2 with λ = 0 and RandK(1): ``H^k`` is positive definite at every iteration and
    ``H^k ⪰ ∇²f(x^k)`` (the 2γ construction)."""
    A, b = problem(8)
    x = param(value=0.2)
    opt = make(x, A, b, variant="nl2", lam=0.0, generator=torch.Generator().manual_seed(1))
    state = opt.state[x]
    for _ in range(80):
        _, _, hx = dense(A, b, x.detach(), lam=0.0)
        h = state["h"]
        beta = ((hx.reshape(h.shape) + 0.5) / (h + 0.5)).max()
        Hk = beta * state["A"] - 0.5 * state["B"]
        assert float(torch.linalg.eigvalsh(Hk)[0]) > 0
        assert float(torch.linalg.eigvalsh(Hk - gram(A, hx))[0]) >= -1e-12
        opt.step()
    assert float(dense(A, b, x.detach(), lam=0.0)[1].norm()) < 1e-9


# ------------------------------------------------------------------------------------------------
# Losses, dtypes
# ------------------------------------------------------------------------------------------------


def test_custom_loss_derivatives_from_torch_func_match_logistic():
    # |t| ≤ 15: torch's softplus is linear above 20 (its φ'' would be 0 there)
    t = torch.linspace(-15, 15, 101, dtype=torch.float64)
    b = torch.where(torch.arange(101) % 2 == 0, 1.0, -1.0).double()
    custom, builtin = glm_loss(lambda t, b: softplus(-b * t)), glm_loss("logistic")
    for f in ("value", "d1", "d2"):
        assert torch.allclose(
            getattr(custom, f)(t, b), getattr(builtin, f)(t, b), rtol=1e-8, atol=1e-16
        )
    A, bb = problem(9)
    xs = []
    for loss in ("logistic", lambda t, b: softplus(-b * t)):
        x = param()
        opt = make(x, A, bb, loss=loss, generator=torch.Generator().manual_seed(0))
        for _ in range(10):
            opt.step()
        xs.append(x.detach().clone())
    assert torch.allclose(xs[0], xs[1], rtol=1e-12, atol=1e-14)


def test_squared_loss_reaches_ridge_solution():
    A, b = problem(10)
    x = param()
    opt = make(x, A, b, loss="squared", variant="nl2", compressor=RandK(5), lam=0.1)
    for _ in range(200):
        opt.step()
    ridge = torch.linalg.solve(
        A.T @ A / len(b) + 0.1 * torch.eye(D, dtype=A.dtype), A.T @ b / len(b)
    )
    assert torch.allclose(x.detach(), ridge, atol=1e-10)


def test_float32_features_and_weight_layout():
    """``nn.Linear(d, 1, bias=False).weight`` (shape ``(1, d)``), float32 data; the ``d×d``
    algebra stays float64."""
    A, b = problem(11)
    lin = torch.nn.Linear(D, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    opt = NewtonLearn(lin.parameters(), A.float(), b.float(), num_nodes=N_NODES)
    assert opt.state[lin.weight]["H"].dtype == torch.float64
    for _ in range(100):
        P = opt.step()
    assert P.dtype == torch.float32
    assert float(dense(A, b, lin.weight.detach().double().reshape(-1))[1].norm()) < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS_ALL)
def test_cuda_matches_cpu(variant):
    """Features on the GPU: every tensor of the step stays there (the compressors' draws come
    from the CPU generator and are moved), and the iterates equal the CPU run's."""
    A, b = problem(14)
    runs = []
    for device in ("cpu", "cuda"):
        x = torch.full((D,), 0.5, dtype=torch.float64, device=device, requires_grad=True)
        opt = make(
            x,
            A.to(device),
            b.to(device),
            variant=variant,
            generator=torch.Generator().manual_seed(0),
        )
        runs.append(torch.stack([opt.step() * 0 + x.detach().cpu() for _ in range(15)]))
        assert x.device.type == device
        assert all(t.device.type == device for k, t in opt.state[x].items() if k in ("h", "H", "A"))
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-10)


def test_simulated_nodes_are_vectorised(monkeypatch):
    """One step with 50 nodes calls the compressor once on the ``(50, m)`` batch and the
    Hessian-accumulation kernel once for all changed rows: no per-node Python loop."""
    from torch_rankone import _ext

    calls = {"compress": [], "accumulate": []}

    class Counting(RandK):
        def __call__(self, x, generator=None):
            calls["compress"].append(tuple(x.shape))
            return super().__call__(x, generator)

    real = _ext.gathered_outer_accumulate

    def counting_accumulate(H, A, idx, coef):
        calls["accumulate"].append(len(idx))
        return real(H, A, idx, coef)

    monkeypatch.setattr(_ext, "gathered_outer_accumulate", counting_accumulate)
    A, b = problem(15, rows=50 * 4)
    opt = make(param(), A, b, num_nodes=50, compressor=Counting(1), eta=1.0)
    opt.step()
    opt.step()
    assert calls["compress"] == [(50, 4), (50, 4)]
    assert len(calls["accumulate"]) == 2 and calls["accumulate"][1] == 50


# ------------------------------------------------------------------------------------------------
# Bits accounting, by hand
# ------------------------------------------------------------------------------------------------


def _tiny(**kw):
    """n = 2 nodes, m = 3 rows, d = 2; ``h^0 = h(x^0)``, so the first messages are zero."""
    A, b = problem(12, rows=6, d=2)
    x = param(d=2, value=0.1)
    return x, NewtonLearn([x], A, b, num_nodes=2, generator=torch.Generator().manual_seed(0), **kw)


def test_bits_option1_realistic_by_hand():
    x, opt = _tiny(compressor=RandK(1))
    init = 2 * 32 * (2 * 3 / 2)  # each node's local Hessian: 32·d(d+1)/2 = 96, two nodes
    assert float(opt.state[x]["bits_sent"]) == init
    per_msg = 32 + math.log2(3)  # RandK(1) of m = 3: one value, one of 3 positions
    opt.step()  # zero messages (h^0 = h(x^0)): gradients and messages, no a_ij
    it1 = init + 2 * 32 * 2 + 2 * per_msg
    assert opt.history[-1]["bits"] == pytest.approx(it1, rel=1e-15)
    opt.step()  # both nodes change one coefficient: + 2 rows a_ij of 32·d bits
    it2 = it1 + 2 * 32 * 2 + 2 * per_msg + 2 * 32 * 2
    assert opt.history[-1]["bits"] == pytest.approx(it2, rel=1e-15)
    assert float(opt.state[x]["bits_sent"]) == pytest.approx(it2, rel=1e-15)


def test_bits_option2_and_nl2_by_hand():
    x, opt = _tiny(compressor=RandK(1), option=2, variant="nl2")
    init = 2 * 32 * 3  # the server holds the data: each node sends h^0 (m = 3 floats)
    per_iter = 2 * (32 * 2 + 32 + math.log2(3) + 32)  # gradient, message, β; no a_ij
    opt.step()
    opt.step()
    assert opt.history[-1]["bits"] == pytest.approx(init + 2 * per_iter, rel=1e-15)
    x, opt = _tiny(compressor=RandK(1), variant="nl2")  # Option 1: A_i^0 and B_i at init
    assert float(opt.state[x]["bits_sent"]) == 2 * 2 * 32 * 3


@pytest.mark.parametrize(("variant", "extra"), [("nl1", 0), ("nl2", 32), ("cnl", 32)])
def test_bits_paper_accounting_by_hand(variant, extra):
    """The authors' count, one node's uplink: ``32·d(d+1)/2`` once, then ``32(d + rd + r)``
    per iteration (``+32`` for β), with d = 2 and RandK(2)."""
    x, opt = _tiny(compressor=RandK(2), variant=variant, accounting="paper")
    for _ in range(3):
        opt.step()
    assert [h["bits"] for h in opt.history] == [
        32 * 3 + k * (32 * (2 + 2 * 2 + 2) + extra) for k in (1, 2, 3)
    ]


def test_paper_accounting_refuses_other_compressors():
    with pytest.raises(ValueError, match="accounting='paper'"):
        _tiny(compressor=RandomDithering(2), accounting="paper")


# ------------------------------------------------------------------------------------------------
# Checkpointing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(variant="cnl"), dict(solver="cholesky_update", compressor=TopK(2))],
    ids=["nl1", "cnl", "nl1-update"],
)
def test_resume_is_bit_for_bit(kw):
    A, b = problem(13)
    x = param(value=0.4)
    opt = make(x, A, b, generator=torch.Generator().manual_seed(3), **kw)
    for _ in range(5):
        opt.step()
    saved_x, saved = x.detach().clone(), copy.deepcopy(opt.state_dict())
    hessian = {"A", "B"} if kw.get("variant") == "cnl" else {"H"}
    assert {"h", "generator_state", "bits_sent", *hessian} <= set(saved["state"][0])
    tail = [(opt.step(), x.detach().clone()) for _ in range(6)]

    y = param()
    with torch.no_grad():
        y.copy_(saved_x)
    other = make(y, A, b, generator=torch.Generator().manual_seed(999), **kw)
    other.load_state_dict(saved)
    for P, xk in tail:
        assert torch.equal(other.step(), P)
        assert torch.equal(y.detach(), xk)
    assert torch.equal(other.state[y]["bits_sent"], opt.state[x]["bits_sent"])
    assert [h["loss"] for h in other.history] == [h["loss"] for h in opt.history]


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(variant="nl3"), ValueError, "variant"),
        (dict(lam=0.0), ValueError, "lam"),
        (dict(compressor="randk"), TypeError, "compressor"),
        (dict(num_nodes=7), ValueError, "num_nodes=7"),
        (dict(option=3), ValueError, "option"),
        (dict(accounting="x"), ValueError, "accounting"),
        (dict(solver="cholesky_update", variant="nl2"), ValueError, "cholesky_update"),
        (dict(loss="hinge"), ValueError, "loss"),
        (dict(loss=3), TypeError, "loss"),
        (dict(loss=lambda t, b: t * t, variant="nl2"), ValueError, "gamma"),
        (dict(loss=lambda t, b: t * t, variant="cnl", gamma=1.0), ValueError, "cubic_reg"),
        (dict(h0=-torch.ones(N_NODES * M_ROWS, dtype=torch.float64)), ValueError, "h0"),
        (dict(eta=0.0), ValueError, "eta"),
        (dict(generator=0), TypeError, "generator"),
        (dict(process_group=object()), ProtocolError, "not initialised"),
    ],
)
def test_bad_arguments(kw, error, match):
    A, b = problem()
    with pytest.raises(error, match=match):
        make(param(), A, b, **kw)


def test_bad_data_and_closure():
    A, b = problem()
    with pytest.raises(ValueError, match="features"):
        make(param(d=D + 1), A, b)
    with pytest.raises(TypeError, match="dtype"):
        make(param(), A.float(), b)
    with pytest.raises(ValueError, match="targets"):
        make(param(), A, b[:-1])
    with pytest.raises(ValueError, match="exactly one"):
        NewtonLearn([param(), param()], A, b)
    opt = make(param(), A, b)
    with pytest.raises(TypeError, match="no closure"):
        opt.step(lambda: 0.0)


# ------------------------------------------------------------------------------------------------
# Real data (acceptance runs): a9a split as in the paper, w8a
# ------------------------------------------------------------------------------------------------

SPLITS = {"a9a": (80, 407), "w8a": (142, 350)}
_optimum: dict[str, tuple] = {}


def real_problem(name):
    """The dataset split into ``n`` nodes of ``m`` rows; the remainder rows are dropped as in
    the paper (a9a: 32561 = 80·407 + 1, w8a: 49749 = 142·350 + 49). ``P*``: 25 float64
    Newton iterations."""
    if name not in _optimum:
        from torch_rankone.data import libsvm

        try:
            A, b = libsvm(name, dtype=torch.float64)
        except FileNotFoundError as exc:
            pytest.skip(f"{name} not available: {exc}")
        n, m = SPLITS[name]
        assert A.shape[0] - n * m == {"a9a": 1, "w8a": 49}[name]
        A, b = A[: n * m].contiguous(), b[: n * m].contiguous()
        _, values = glm_newton(A, b, lam=LAM, iterations=25)
        assert abs(values[-1] - values[-2]) < 1e-15
        _optimum[name] = (A, b, values[-1])
    return _optimum[name]


FAR = 3.0  # x⁰ = 3·1: ‖x⁰‖ ≈ 33 vs ‖x*‖ ≈ 4 on a9a, P(x⁰) − P* ≈ 32, and NL2 diverges from it

CASES = [
    ("a9a", "nl1", 0.0, 400),
    ("a9a", "nl2", 0.0, 400),
    ("a9a", "cnl", 0.0, 600),
    pytest.param("a9a", "cnl", FAR, 1200, marks=pytest.mark.slow),
    pytest.param("w8a", "nl1", 0.0, 1000, marks=pytest.mark.slow),
    pytest.param("w8a", "nl2", 0.0, 1200, marks=pytest.mark.slow),
]


def _run_to_1e10(name, variant, start, budget):
    A, b, p_star = real_problem(name)
    x = param(d=A.shape[1], value=start)
    opt = NewtonLearn(
        [x],
        A,
        b,
        variant=variant,
        num_nodes=SPLITS[name][0],
        generator=torch.Generator().manual_seed(0),
    )
    begin = time.perf_counter()
    gap = math.inf
    while gap > 1e-10 and len(opt.history) < budget and not math.isnan(gap):
        gap = float(opt.step()) - p_star
    print(
        f"\n{name} {variant} x0={start}: {len(opt.history)} iterations, P-P*={gap:.2e}, "
        f"{float(opt.state[x]['bits_sent']):.4g} bits, {time.perf_counter() - begin:.2f} s"
    )
    return gap


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("name", "variant", "start", "budget"), CASES)
def test_real_data_reaches_1e10(name, variant, start, budget):
    """L2-regularised logistic regression, RandK(1), λ = 1e-3, η = 1/(ω+1) = 1/m: NL1, NL2
    and CNL reach ``P(x) − P* ≤ 1e-10`` (CNL also from the far start). w8a's CNL runs (1065
    iterations from 0, an eigendecomposition of 300×300 each) are in
    ``examples/newton_learn_distributed.py`` and the README, not in the suite."""
    gap = _run_to_1e10(name, variant, start, budget)
    assert gap <= 1e-10, f"{name} {variant}: P − P* = {gap:.3e} after {budget} iterations"


@pytest.mark.usefixtures("one_thread")
def test_far_start_is_far_for_nl2():
    """The far start is outside NL2's (local) convergence region: it does not get below
    P − P* = 1 in 100 iterations, where CNL converges (previous test)."""
    assert not _run_to_1e10("a9a", "nl2", FAR, 100) < 1.0
