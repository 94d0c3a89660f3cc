"""Step-level contracts of RankOneNewton, NeumannIHVP and FisherNewton against independent dense
float64 references (explicit Hessians, per-sample gradients by a loop over samples), written
from the docstring formulas: each test pins one behaviour a plausible bug would change."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton
from torch_rankone.optim import CurvatureError
from torch_rankone.optim import fisher_newton as fn

F64 = torch.float64


# ---- Shared problems and references ------------------------------------------------------------


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _quadratic(eigs, seed=0):
    """H = Q diag(eigs) Qᵀ (dense float64), b, and the start x₀ for f = ½xᵀHx − bᵀx."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    H = Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T
    return H, torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)


def _power_iteration(A, v, max_iters=20, tol=1e-3):
    """The estimator the optimizers document: v ← Av/‖Av‖ from a Gaussian start, stopping when
    ‖Av − λv‖/|λ| ≤ tol or after max_iters products; returns λ = vᵀAv."""
    v = v / v.norm()
    for _ in range(max_iters):
        av = A @ v
        lam = v @ av
        if (av - lam * v).norm() / lam.abs() <= tol:
            return lam
        v = av / av.norm()
    return lam


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(8, 3, generator=gen, dtype=F64), torch.randint(0, 2, (8,), generator=gen)
    return model, X, Y


def _per_sample_jacobian(model: nn.Module, per_sample_loss, B: int) -> torch.Tensor:
    """(B, N): row s is ∇ of per_sample_loss(s) (a function of the model), one backward each."""
    params = list(model.parameters())
    rows = []
    for s in range(B):
        gs = torch.autograd.grad(per_sample_loss(s), params)
        rows.append(torch.cat([t.reshape(-1) for t in gs]))
    return torch.stack(rows)


def _raises(exc, call) -> str:
    with pytest.raises(exc) as info:
        call()
    return str(info.value)


_CONFIGS = {
    "diag-relative": (RankOneNewton, dict(rank=2)),
    "diag-fixed": (RankOneNewton, dict(damping_mode="fixed", delta=0.1)),
    # weight decay: the unfused update (the fused one is the next case)
    "isotropic": (RankOneNewton, dict(preconditioner="isotropic", weight_decay=1e-3)),
    "isotropic-fused": (RankOneNewton, dict(preconditioner="isotropic")),
    "isotropic-fixed": (
        RankOneNewton,
        dict(preconditioner="isotropic", damping_mode="fixed", damping=50.0, weight_decay=1e-3),
    ),  # fmt: skip
    "theory": (
        RankOneNewton,
        dict(
            preconditioner="isotropic",
            damping_mode="theory",
            hessian_lipschitz=1.0,
            weight_decay=1e-3,
        ),
    ),  # fmt: skip
    "theory-given": (
        RankOneNewton,
        dict(
            preconditioner="isotropic",
            damping_mode="theory",
            hessian_lipschitz=1.0,
            lambda_max=2.0,
            weight_decay=1e-3,
        ),
    ),  # fmt: skip
    "neumann": (NeumannIHVP, dict()),
    "neumann-fixed": (NeumannIHVP, dict(damping_mode="fixed", damping=1.0)),
    "neumann-scale": (NeumannIHVP, dict(damping_mode="fixed", damping=0.1, scale=30.0)),
    "fisher": (FisherNewton, dict()),
    "fisher-fixed": (FisherNewton, dict(damping_mode="fixed", damping=0.1)),
    "fisher-theory": (FisherNewton, dict(damping_mode="theory", hessian_lipschitz=1.0)),
    "fisher-true": (FisherNewton, dict(fisher="true")),
    "fisher-true-mse": (FisherNewton, dict(fisher="true", loss_type="mse")),
}


# ---- Every optimizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_steps_do_not_depend_on_the_default_device(name):
    """Every tensor a step makes lives on the parameters' device: under a default device of
    "meta" (no data) two steps give bit for bit the steps made without it."""
    plain, meta = _two_steps(name, meta=False), _two_steps(name, meta=True)
    assert torch.isfinite(plain).all() and not torch.equal(plain, _flat(_mlp()[0].parameters()))
    assert torch.equal(plain, meta)


def _two_steps(name: str, *, meta: bool) -> torch.Tensor:
    model, X, Y = _mlp()
    cls, kwargs = _CONFIGS[name]
    opt = cls(model.parameters(), generator=torch.Generator().manual_seed(2), **kwargs)
    ce = nn.functional.cross_entropy
    T = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=F64)

    def closure():
        if kwargs.get("fisher") == "true":
            return model(X), (T if kwargs.get("loss_type") == "mse" else Y)
        if cls is FisherNewton:
            return ce(model(X), Y, reduction="none")
        return ce(model(X), Y)

    with torch.device("meta") if meta else torch.device("cpu"):
        for _ in range(2):
            opt.step(closure)
    return _flat(model.parameters())


@pytest.mark.parametrize(
    "name", ["isotropic", "isotropic-fixed", "theory", "diag-relative", "diag-fixed", "neumann",
             "fisher", "fisher-fixed", "fisher-theory"],
)  # fmt: skip
def test_float32_state_stays_in_the_parameters_dtype(name):
    """The scalars a step keeps (the shift, λ_max, the scale) have the parameters' dtype
    (float32 here), also when the closure returns a float64 loss (not for FisherNewton,
    whose per-sample losses must have the parameters' dtype)."""
    model, X, Y = _mlp()
    model.float()
    cls, kwargs = _CONFIGS[name]
    opt = cls(model.parameters(), **kwargs)
    ce = nn.functional.cross_entropy
    for _ in range(2):
        if cls is FisherNewton:
            opt.step(lambda: ce(model(X.float()), Y, reduction="none"))
        else:
            opt.step(lambda: ce(model(X.float()), Y).double())
    for key in ("damping", "lambda_max", "scale"):
        if key in opt.global_state and not torch.isnan(opt.global_state[key]):
            assert opt.global_state[key].dtype == torch.float32, key
    assert torch.isfinite(_flat(model.parameters())).all()


@pytest.mark.parametrize(
    "name", ["diag-relative", "isotropic", "isotropic-fused", "neumann", "neumann-scale", "fisher"]
)
def test_a_non_finite_loss_alone_skips_the_step(name):
    """A NaN loss with a finite gradient and curvature (a NaN constant added) still skips."""
    model, X, Y = _mlp()
    cls, kwargs = _CONFIGS[name]
    opt = cls(model.parameters(), **kwargs)
    x0 = _flat(model.parameters())
    nan = torch.tensor(math.nan, dtype=F64)
    reduction = "none" if cls is FisherNewton else "mean"
    opt.step(lambda: nn.functional.cross_entropy(model(X), Y, reduction=reduction) + nan)
    assert torch.equal(_flat(model.parameters()), x0)
    assert opt.counters()["skipped_steps"] == 1 and int(opt.global_state["step"]) == 0


# ---- RankOneNewton: theory mode's estimated λ_max ----------------------------------------------


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("eigs", [
    [3.0, 2.7, 1.0, -0.5, 0.2],  # 20 products: not converged
    [3.0, 1.0, 0.8, -0.5, 0.2],  # converged (tol 1e-3) before 20
])  # fmt: skip
def test_theory_mode_estimated_lambda_max_steps_equal_dense_formula(eigs):
    """lambda_max=None: |λ_max(H)| by 20 power iterations (from the generator's Gaussian draw
    after u's) at calls 0 and 2 (lambda_max_refresh=2), kept at call 1; each step is
    x ← x − lr (S + cI)⁻¹ g, S = (N/2)(h uᵀ + u hᵀ), c = δ + √(M‖g‖/2) + √(λ²N(N−1) + Nδ²),
    raised by the safeguard to |μ₋| + c/2 when |μ₋| > c/2."""
    H, b, x0 = _quadratic(eigs, seed=3)
    M, delta, lr, n = 0.7, 0.05, 0.9, 5
    gen = torch.Generator().manual_seed(4)
    x = x0.clone()
    expected, lams = [], []
    for call in range(3):
        z = torch.randn(n, generator=gen, dtype=F64)
        u = z / z.norm()
        if call != 1:
            lam = _power_iteration(H, torch.randn(n, generator=gen, dtype=F64)).abs()
        lams.append(lam)
        g, h = H @ x - b, H @ u
        c = delta + math.sqrt(M * float(g.norm()) / 2) + math.sqrt(
            float(lam) ** 2 * n * (n - 1) + n * delta**2)  # fmt: skip
        mu = (n / 2) * float(h @ u - h.norm())
        c = max(c, -mu + c / 2)
        S = (n / 2) * (torch.outer(h, u) + torch.outer(u, h))
        x = x - lr * torch.linalg.solve(S + c * torch.eye(n, dtype=F64), g)
        expected.append(x)
    assert lams[0] != lams[2]  # two estimates from different starts differ here

    xt = x0.clone().requires_grad_()
    opt = RankOneNewton([xt], lr=lr, delta=delta, preconditioner="isotropic",
                        damping_mode="theory", hessian_lipschitz=M, lambda_max_refresh=2,
                        generator=torch.Generator().manual_seed(4))  # fmt: skip
    for call in range(3):
        opt.step(lambda: 0.5 * xt @ H @ xt - b @ xt)
        torch.testing.assert_close(opt.global_state["lambda_max"], lams[call], rtol=1e-12, atol=0)
        want = expected[call]
        assert (xt.detach() - want).norm() / want.norm() < 1e-11, call


def test_theory_mode_resumes_without_estimating_lambda_max_again():
    """The estimate is saved: a resumed run at a non-refresh call keeps it (bit for bit)."""
    H, b, x0 = _quadratic([3.0, 2.7, 1.0, -0.5, 0.2], seed=3)

    def make(x):
        return RankOneNewton(
            [x],
            preconditioner="isotropic",
            damping_mode="theory",
            hessian_lipschitz=0.5,
            generator=torch.Generator().manual_seed(4),
        )

    x = x0.clone().requires_grad_()
    opt = make(x)
    opt.step(lambda: 0.5 * x @ H @ x - b @ x)
    saved, x1 = opt.state_dict(), x.detach().clone()
    opt.step(lambda: 0.5 * x @ H @ x - b @ x)
    y = x1.clone().requires_grad_()
    opt2 = make(y)
    opt2.load_state_dict(saved)
    opt2.step(lambda: 0.5 * y @ H @ y - b @ y)
    assert torch.equal(y.detach(), x.detach())


# ---- RankOneNewton: the isotropic step ---------------------------------------------------------


def _isotropic_dense(H, b, x0, u, lr, cs, sizes, safeguard=True):
    """One relative-mode isotropic step: c_t = delta_t + damping_t·(N/2)‖h‖ per group, raised
    together by the safeguard, y_t = c_t [(S + Λ)⁻¹ g]_t (γ = c), x ← x − lr_t y_t."""
    n = len(x0)
    h = H @ u
    c = torch.cat([torch.full((k,), float(ci), dtype=F64) for ci, k in zip(cs, sizes)])
    if safeguard:
        mu = (n / 2) * (h @ u - h.norm())
        c = c + (-mu - c.min() / 2).clamp_min(0.0)
    S = (n / 2) * (torch.outer(h, u) + torch.outer(u, h))
    y = c * torch.linalg.solve(S + torch.diag(c), H @ x0 - b)
    lrs = torch.cat([torch.full((k,), float(li), dtype=F64) for li, k in zip(lr, sizes)])
    return x0 - lrs * y, c


@pytest.mark.parametrize("groups", [False, True])
def test_isotropic_relative_step_equals_dense_formula(groups):
    """Relative damping (the isotropic default): α = damping·(N/2)‖h‖, c = delta + α, and the
    step is lr·c(S + cI)⁻¹g — fused for one group, per group with their own lr/damping/delta."""
    H, b, x0 = _quadratic([3.0, 2.0, 1.0, 0.5, 0.2, 0.1], seed=7)
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(6, generator=gen, dtype=F64)
    u = z / z.norm()
    h_norm = float((H @ u).norm())
    x = x0.clone().requires_grad_()
    if groups:
        a = x0[:2].clone().requires_grad_()  # two groups: two leaf tensors
        c2 = x0[2:].clone().requires_grad_()
        params = [{"params": [a], "lr": 0.3, "damping": 6.0, "delta": 0.2},
                  {"params": [c2]}]  # fmt: skip
        opt = RankOneNewton(params, lr=0.5, damping=4.5, delta=0.1, preconditioner="isotropic",
                            generator=torch.Generator().manual_seed(8))  # fmt: skip
        cs = [0.2 + 6.0 * 3 * h_norm, 0.1 + 4.5 * 3 * h_norm]
        expected, c = _isotropic_dense(H, b, x0, u, [0.3, 0.5], cs, [2, 4])

        def closure():
            w = torch.cat([a, c2])
            return 0.5 * w @ H @ w - b @ w

        opt.step(closure)
        got = torch.cat([a.detach(), c2.detach()])
    else:
        opt = RankOneNewton([x], lr=0.5, damping=4.5, delta=0.1, preconditioner="isotropic",
                            generator=torch.Generator().manual_seed(8))  # fmt: skip
        expected, c = _isotropic_dense(H, b, x0, u, [0.5], [0.1 + 4.5 * 3 * h_norm], [6])
        opt.step(lambda: 0.5 * x @ H @ x - b @ x)
        got = x.detach()
    assert (got - expected).norm() / (expected - x0).norm() < 1e-12
    torch.testing.assert_close(opt.global_state["damping"], c[0], rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "lr,damping,gain",
    [(5e307, 1.0, 100.0), (torch.finfo(F64).max ** 0.5, 1e-100, 1e60)],
    ids=["huge-lr", "sqrt-max-lr"],
)
def test_isotropic_step_whose_update_overflows_is_skipped(lr, damping, gain):
    """lr·y beyond the dtype's range with lr/c finite: the fused kernel checks lr/c, not lr·y,
    so an lr from √max(dtype) on takes the unfused update, which skips the step."""
    H, b, x0 = _quadratic([3.0, 2.0, 1.0, 0.5], seed=9)
    b = gain * b
    x = x0.clone().requires_grad_()
    opt = RankOneNewton([x], lr=lr, damping=damping, damping_mode="fixed",
                        preconditioner="isotropic", safeguard=False)  # fmt: skip
    opt.step(lambda: 0.5 * x @ H @ x - b @ x)
    assert torch.equal(x.detach(), x0) and opt.counters()["skipped_steps"] == 1


@pytest.mark.parametrize("mode", ["relative", "fixed"])
def test_isotropic_tensor_lr_gives_the_float_lr_step(mode):
    """An lr held as a (float32) tensor, as a scheduler may leave it: the same fused step."""
    H, b, x0 = _quadratic([3.0, 2.0, 1.0, 0.5], seed=9)
    out = []
    for lr in (0.25, torch.tensor(0.25)):
        x = x0.clone().requires_grad_()
        opt = RankOneNewton([x], lr=lr, preconditioner="isotropic", damping_mode=mode,
                            damping=5.0, generator=torch.Generator().manual_seed(1))  # fmt: skip
        opt.step(lambda: 0.5 * x @ H @ x - b @ x)  # noqa: B023
        out.append(x.detach())
    assert not torch.equal(out[0], x0) and torch.equal(out[0], out[1])


def test_rank_one_newton_direction_equals_dense_solve():
    """y = (S + Λ)⁻¹ g, S = (N/2)(h uᵀ + u hᵀ), Λ = c_t on tensor t; N = the vectors' size
    unless given (shards)."""
    from torch_rankone.optim.rank_one_newton import rank_one_newton_direction

    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3), (4,)]
    g, h, u = ([torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(3))
    c = [torch.tensor(2.0, dtype=F64), torch.tensor(5.0, dtype=F64)]
    flat = [torch.cat([t.reshape(-1) for t in v]) for v in (g, h, u)]
    lam = torch.diag(torch.tensor([2.0] * 6 + [5.0] * 4, dtype=F64))
    for n in (None, 7):
        N = 10 if n is None else n
        S = (N / 2) * (torch.outer(flat[1], flat[2]) + torch.outer(flat[2], flat[1]))
        want = torch.linalg.solve(S + lam, flat[0])
        y, ok = rank_one_newton_direction(g, h, u, c, n)
        assert bool(ok)
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in y]), want, rtol=1e-12,
                                   atol=1e-14)  # fmt: skip
    y, _ = rank_one_newton_direction(g[1:], h[1:], u[1:], c[1:])  # one tensor
    S = 2 * (torch.outer(h[1], u[1]) + torch.outer(u[1], h[1]))
    torch.testing.assert_close(y[0], torch.linalg.solve(S + 5 * torch.eye(4, dtype=F64), g[1]),
                               rtol=1e-12, atol=1e-14)  # fmt: skip


def test_symmetrised_outer_coefficients_are_exact_float64():
    """C = [[0, N/2], [N/2, 0]] in float64: N/2 exactly, also beyond float32's integers."""
    from torch_rankone.optim.rank_one_newton import _symmetrised_outer_coefficients

    n = 2**24 + 1
    C = _symmetrised_outer_coefficients(n)
    assert C.dtype == F64
    assert torch.equal(C, torch.tensor([[0.0, n / 2], [n / 2, 0.0]], dtype=F64))


# ---- RankOneNewton: the diagonal-plus-low-rank step --------------------------------------------


@pytest.mark.parametrize("mode", ["relative", "fixed"])
def test_diag_lowrank_first_step_on_one_tensor_equals_dense_formula(mode):
    """First call, rank 1, init_probes 3: Λ = sqrt(mean of (w ⊙ Hw)² over the 3 probes),
    δ = damping·mean(Λ) (relative) or damping (fixed), P = diag(Λ + δ + delta) + h hᵀ/(uᵀh)
    (u the first probe, h = Hu), x ← x − lr P⁻¹ g; state["damping"] is δ."""
    H, b, x0 = _quadratic([3.0, 2.0, 1.0, 0.5, 0.2], seed=5)
    lr, damping, delta = 0.4, 0.3, 0.05
    gen = torch.Generator().manual_seed(6)
    probes = [torch.randint(0, 2, (5,), generator=gen, dtype=F64) * 2 - 1 for _ in range(3)]
    lam = torch.stack([(w * (H @ w)) ** 2 for w in probes]).mean(0).sqrt()
    d = damping * lam.mean() if mode == "relative" else torch.tensor(damping, dtype=F64)
    u = probes[0]
    h = H @ u
    assert u @ h > 0
    P = torch.diag(lam + d + delta) + torch.outer(h, h) / (u @ h)
    g = H @ x0 - b
    expected = x0 - lr * torch.linalg.solve(P, g)
    x = x0.clone().requires_grad_()
    opt = RankOneNewton(
        [x],
        lr=lr,
        damping=damping,
        delta=delta,
        damping_mode=mode,
        momentum=0.0,
        init_probes=3,
        generator=torch.Generator().manual_seed(6),
    )
    opt.step(lambda: 0.5 * x @ H @ x - b @ x)  # fmt: skip
    assert (x.detach() - expected).norm() / (expected - x0).norm() < 1e-12
    torch.testing.assert_close(opt.global_state["damping"], d, rtol=1e-13, atol=0)


def _diag_lowrank_dense_run(H, b, x0, steps, rank, lr, damping, beta2, seed):
    """Dense steps of the diag+lowrank preconditioner (momentum 0, one probe per call):
    Λ = sqrt(v_t/(1 − β₂^t)), δ = damping·mean(Λ), Nyström of the last min(t, rank) sketches."""
    gen = torch.Generator().manual_seed(seed)
    x, v, Om = x0.clone(), torch.zeros_like(x0), []
    out = []
    for t in range(1, steps + 1):
        u = torch.randint(0, 2, x0.shape, generator=gen, dtype=F64) * 2 - 1
        h = H @ u
        v = beta2 * v + (1 - beta2) * (u * h) ** 2
        lam = (v / (1 - beta2**t)).sqrt()
        Om = (Om + [u])[-rank:]
        O = torch.stack(Om, 1)
        Y = H @ O
        P = torch.diag(lam + damping * lam.mean()) + Y @ torch.linalg.inv(O.T @ Y) @ Y.T
        x = x - lr * torch.linalg.solve(P, H @ x - b)
        out.append(x)
    return out


def test_diag_lowrank_keeps_the_last_rank_sketches_over_many_steps():
    """rank 3 over 5 calls: the Nyström part uses the last min(t, 3) sketch pairs (the oldest
    dropped once 3 are kept), the diagonal the bias-corrected average of (u ⊙ h)²."""
    H, b, x0 = _quadratic([3.0, 2.0, 1.5, 1.0, 0.5, 0.2], seed=10)
    want = _diag_lowrank_dense_run(H, b, x0, 5, 3, 0.5, 0.1, 0.9, seed=12)
    x = x0.clone().requires_grad_()
    opt = RankOneNewton([x], lr=0.5, damping=0.1, rank=3, beta2=0.9, momentum=0.0,
                        init_probes=1, generator=torch.Generator().manual_seed(12))  # fmt: skip
    for t in range(5):
        opt.step(lambda: 0.5 * x @ H @ x - b @ x)
        assert (x.detach() - want[t]).norm() / want[t].norm() < 1e-11, t


def test_diag_lowrank_state_keys_and_the_legacy_sketch_format():
    """Per-parameter state: exactly the documented buffers; a v0.1 checkpoint that kept the
    older sketches as one (2, kept, *shape) tensor loads into the named slots."""
    H, b, x0 = _quadratic([3.0, 2.0, 1.5, 1.0, 0.5, 0.2], seed=10)
    x = x0.clone().requires_grad_()
    opt = RankOneNewton([x], rank=3, generator=torch.Generator().manual_seed(1))
    assert set(opt.state[x]) >= {"hessian_sq_avg", "momentum_buffer"}
    assert {k for k in opt.state[x] if k.startswith("sketch")} == {
        "sketch_u0", "sketch_h0", "sketch_u1", "sketch_h1"}  # fmt: skip
    for _ in range(3):
        opt.step(lambda: 0.5 * x @ H @ x - b @ x)
    saved = opt.state_dict()
    entry = saved["state"][0]
    legacy = torch.stack([torch.stack([entry.pop(f"sketch_{w}0"), entry.pop(f"sketch_{w}1")])
                          for w in "uh"])  # fmt: skip
    entry["sketches"] = legacy
    y = x0.clone().requires_grad_()
    opt2 = RankOneNewton([y], rank=3)
    opt2.load_state_dict(saved)
    for w in "uh":
        for j in range(2):
            assert torch.equal(opt2.state[y][f"sketch_{w}{j}"], legacy[0 if w == "u" else 1, j])
    assert "sketches" not in opt2.state[y]


def test_nystrom_core_is_float64_and_cuts_at_rcond_times_the_largest():
    """C = (ΩᵀY)₊⁺ is float64 for float32 sketches; eigenvalues θ ≤ rcond·max|θ| are dropped
    (θ = rcond·max exactly is dropped), one sketch with θ ≤ 0 gives 0."""
    from torch_rankone.optim.rank_one_newton import nystrom_core

    e = torch.eye(2)
    W = torch.diag(torch.tensor([2.0, 2e-6], dtype=F64))
    C = nystrom_core([[e[0].double()], [e[1].double()]], [[W[0]], [W[1]]])
    torch.testing.assert_close(C, torch.diag(torch.tensor([0.5, 0.0], dtype=F64)), rtol=1e-15,
                               atol=0)  # fmt: skip
    W32 = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    C = nystrom_core([[e[0]], [e[1]]], [[W32[0]], [W32[1]]])
    assert C.dtype == F64
    torch.testing.assert_close(C, torch.linalg.inv(W32.double()), rtol=1e-12, atol=0)
    one = nystrom_core([[torch.full((3,), 1 / 3)]], [[torch.tensor([0.1, 0.2, 0.4])]])
    assert one.dtype == F64 and one.shape == (1, 1)
    torch.testing.assert_close(one, torch.tensor([[3 / 0.7]], dtype=F64), rtol=1e-7, atol=0)
    zero = nystrom_core([[torch.ones(2, dtype=F64)]], [[torch.tensor([1.0, -1.0], dtype=F64)]])
    assert torch.equal(zero, torch.zeros(1, 1, dtype=F64))


def test_rank_one_group_refusals_say_exactly_what_is_wrong():
    w, v = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    iso = dict(preconditioner="isotropic")
    assert _raises(ValueError, lambda: RankOneNewton(
        [{"params": [w], "damping": -1.0}, {"params": [v]}], **iso)) == (
        "param group damping must be >= 0.0, got -1.0")  # fmt: skip
    assert _raises(ValueError, lambda: RankOneNewton(
        [w], damping=0.0, damping_mode="fixed", **iso)) == (
        "safeguard=True needs delta + damping > 0 (the raised c keeps that value as the "
        "smallest eigenvalue); set a positive damping or safeguard=False")  # fmt: skip
    theory = dict(damping_mode="theory", hessian_lipschitz=1.0, **iso)
    assert _raises(ValueError, lambda: RankOneNewton(
        [{"params": [w], "delta": 0.5}, {"params": [v]}], **theory)) == (
        "damping_mode='theory' needs the same delta in every group")  # fmt: skip
    RankOneNewton([w], damping=0.0, **theory)  # theory mode: α > 0 whatever damping is
    RankOneNewton([{"params": [w], "delta": 0.5}, {"params": [v]}], **iso)  # per-group delta


# ---- NeumannIHVP: the series, the estimated scale and the fallback -----------------------------


def _series(H, g, K, s, lam):
    """(1/s) Σ_{j=0..K} (I − (H + λI)/s)^j g."""
    M = torch.eye(len(g), dtype=F64) - (H + lam * torch.eye(len(g), dtype=F64)) / s
    term, total = g.clone(), g.clone()
    for _ in range(K):
        term = M @ term
        total = total + term
    return total / s


@pytest.mark.filterwarnings("error")  # an estimate that stops at 20 products does not warn
@pytest.mark.parametrize("mode,eigs", [
    ("fixed", [4.0, 2.0, 1.0, 0.5, 0.3]),  # the estimate converges (tol 1e-3) in < 20 products
    ("fixed", [4.0, 3.9, 1.0, 0.5, 0.3]),  # it stops at 20 products, not converged
    ("relative", [4.0, 2.0, 1.0, 0.5, -0.3]),  # relative: H may be indefinite
])  # fmt: skip
def test_neumann_estimated_scale_step_equals_dense_series(mode, eigs):
    """scale=None: s = 1.05·|λ| (fixed, λ of H + λI) or ŝ = 1.5·|λ|, s = ŝ(1 + damping),
    λ_damp = damping·ŝ (relative, λ of H), λ from 20 power iterations started from the
    generator's first Gaussian draw; then y = (1/s) Σ_{j≤K} (I − (H + λI)/s)^j g, x ← x − lr·y."""
    H, b, x0 = _quadratic(eigs)
    damping, lr, K = (0.3, 0.8, 4) if mode == "fixed" else (0.5, 0.6, 5)
    v0 = torch.randn(5, generator=torch.Generator().manual_seed(11), dtype=F64)
    eye = torch.eye(5, dtype=F64)
    if mode == "fixed":
        s = 1.05 * _power_iteration(H + damping * eye, v0).abs()
        lam = damping
    else:
        top = 1.5 * _power_iteration(H, v0).abs()
        s, lam = top * (1 + damping), damping * top
    g = H @ x0 - b
    expected = x0 - lr * _series(H, g, K, s, lam)
    x = x0.clone().requires_grad_()
    opt = NeumannIHVP([x], lr=lr, damping=damping, num_terms=K, damping_mode=mode,
                      generator=torch.Generator().manual_seed(11))  # fmt: skip
    opt.step(lambda: 0.5 * x @ H @ x - b @ x)
    torch.testing.assert_close(opt.global_state["scale"], s, rtol=1e-12, atol=0)
    assert (x.detach() - expected).norm() / (expected - x0).norm() < 1e-11
    assert opt.counters()["neumann_fallbacks"] == 0


def _one_d_neumann(scale_state=None, **kwargs):
    """f = 1.5x² (H = 3) at x = 1, fixed damping 1: H + λI = 4, g = 3."""
    x = torch.ones(1, dtype=F64, requires_grad=True)
    opt = NeumannIHVP([x], damping_mode="fixed", damping=1.0, **kwargs)
    return x, opt, (lambda: 1.5 * (x**2).sum())


def test_neumann_estimated_scale_is_raised_only_by_a_quotient_above_one():
    """An estimated s with A = 4/s: the quotient r = 4/s; r ≤ 1 keeps s, 1 < r < 2 raises it to
    1.05·r·s and keeps the series step (no fallback below 2)."""
    x, opt, f = _one_d_neumann(num_terms=3, lr=1.0)
    opt.step(f)  # the estimate: exactly 1.05·4 in one dimension
    assert float(opt.global_state["scale"]) == pytest.approx(4.2, rel=1e-14)
    opt.global_state["scale"] = torch.tensor(4.0, dtype=F64)  # r = 1 exactly: kept
    x0 = x.detach().clone()
    opt.step(f)
    assert float(opt.global_state["scale"]) == 4.0
    torch.testing.assert_close(x.detach(), x0 - 3 * x0 / 4, rtol=1e-15, atol=0)  # (1/4)·g

    opt.global_state["scale"] = torch.tensor(2.5, dtype=F64)  # r = 1.6: raised, no fallback
    x0 = x.detach().clone()
    opt.step(f)
    assert float(opt.global_state["scale"]) == pytest.approx(1.05 * 1.6 * 2.5, rel=1e-14)
    series = sum((1 - 1.6) ** j for j in range(4)) / 2.5  # K = 3
    torch.testing.assert_close(x.detach(), x0 - series * 3 * x0, rtol=1e-14, atol=0)
    assert opt.counters()["neumann_fallbacks"] == 0


def test_neumann_negative_curvature_falls_back_to_g_over_s():
    """H + λI = −2 < 0: every quotient is negative, so the fallback step is g/s' with
    s' = s·max(1, r) = s (a given scale is never raised)."""
    x = torch.ones(1, dtype=F64, requires_grad=True)
    opt = NeumannIHVP([x], damping_mode="fixed", damping=0.0, scale=0.5, num_terms=3, lr=0.3)
    opt.step(lambda: -(x**2).sum())  # g = −2
    torch.testing.assert_close(x.detach(), torch.tensor([1.0 + 0.3 * 2 / 0.5], dtype=F64),
                               rtol=1e-15, atol=0)  # fmt: skip
    assert opt.counters()["neumann_fallbacks"] == 1 and opt.counters()["skipped_steps"] == 0


def test_neumann_largest_quotient_ignores_non_finite_quotients():
    """The fallback's r is the largest finite Rayleigh quotient, 0 when none is finite."""
    from types import SimpleNamespace

    from torch_rankone.optim.neumann_ihvp import _largest_quotient

    inf, nan = math.inf, math.nan
    for values, want in [([0.5, inf, nan, -inf, 0.25], 0.5), ([inf, nan], 0.0),
                         ([-inf], 0.0), ([-inf, nan, 0.25], 0.25)]:  # fmt: skip
        res = SimpleNamespace(rayleigh_quotients=torch.tensor(values, dtype=F64))
        assert float(_largest_quotient(res)) == want, values


def test_neumann_scale_estimate_beyond_the_dtype_skips_the_step():
    """λ_max = 1.75e308 (finite) makes s = 1.05·λ_max overflow to inf: the step is skipped
    (not applied as the zero step g/inf)."""
    x = torch.ones(1, dtype=F64, requires_grad=True)
    opt = NeumannIHVP([x], damping_mode="fixed", damping=0.0, num_terms=2)
    opt.step(lambda: 0.875e308 * (x**2).sum())
    assert opt.counters()["skipped_steps"] == 1 and int(opt.global_state["step"]) == 0


# ---- FisherNewton: the step --------------------------------------------------------------------


def test_fisher_relative_step_on_one_tensor_equals_dense_formula():
    """One parameter tensor (bias-free Linear, no module): c = damping·tr(D)/B,
    x ← x − lr·c(D + cI)⁻¹g; state["damping"] is c."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).to(F64)
    X, Y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 2, 1, 1, 0])
    ce = nn.functional.cross_entropy
    J = _per_sample_jacobian(model, lambda s: ce(model(X[s : s + 1]), Y[s : s + 1]), 5)
    x0 = _flat(model.parameters())
    D = J.T @ J / 5
    c = 0.7 * torch.trace(D) / 5
    expected = x0 - 0.4 * c * torch.linalg.solve(D + c * torch.eye(12, dtype=F64), J.mean(0))
    opt = FisherNewton(model.parameters(), lr=0.4, damping=0.7)
    opt.step(lambda: ce(model(X), Y, reduction="none"))
    got = _flat(model.parameters())
    assert (got - expected).norm() / (expected - x0).norm() < 1e-12
    torch.testing.assert_close(opt.global_state["damping"], c, rtol=1e-13, atol=0)


def test_fisher_newton_direction_defaults_and_failed_solve():
    """The public solve: y = ((1/B) JᵀJ + Λ)⁻¹ g by default (times_damping=False, Grams computed
    when not given); a non-positive-definite system (negative c) is reported as not solved."""
    torch.manual_seed(0)
    p = torch.zeros(5, dtype=F64)
    J = torch.randn(3, 5, dtype=F64)
    g = torch.randn(5, dtype=F64)
    blk = fn.PerSampleRows([p], [J])
    c = torch.tensor(0.4, dtype=F64)
    y, ok = fn.fisher_newton_direction([blk], {id(p): g}, {id(p): c}, 3)
    want = torch.linalg.solve(J.T @ J / 3 + 0.4 * torch.eye(5, dtype=F64), g)
    assert bool(ok)
    torch.testing.assert_close(y[id(p)], want, rtol=1e-12, atol=1e-14)
    y, ok = fn.fisher_newton_direction([blk], {id(p): g}, {id(p): c}, 3, times_damping=True)
    torch.testing.assert_close(y[id(p)], 0.4 * want, rtol=1e-12, atol=1e-14)
    neg = torch.tensor(-0.01, dtype=F64)  # I + JJᵀ/(Bc) is then not positive definite
    _, ok = fn.fisher_newton_direction([blk], {id(p): g}, {id(p): neg}, 3)
    assert not bool(ok)


def test_fisher_sigma_forms_and_default_optimal_loss():
    """σ = 2f (cross-entropy) and σ = L√2(√(f − f*) + √f*) (mse), f* = 0 by default."""
    f = torch.tensor(0.9, dtype=F64)
    assert float(fn.fisher_sigma("cross_entropy", f)) == pytest.approx(1.8, rel=1e-15)
    assert float(fn.fisher_sigma("mse", f, smoothness=2.0)) == pytest.approx(
        2 * math.sqrt(2) * math.sqrt(0.9), rel=1e-14)  # fmt: skip
    assert float(fn.fisher_sigma("mse", f, smoothness=2.0, f_star=0.25)) == pytest.approx(
        2 * math.sqrt(2) * (math.sqrt(0.65) + 0.5), rel=1e-14)  # fmt: skip


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("use_module", [False, True])
def test_fisher_layer_whose_output_is_unused_gets_a_zero_step(fisher, use_module):
    """A Linear layer called in the closure but not part of the loss: no gradient reaches it
    (its output gradient is None, its rows are zero), so (relative damping) its step is
    lr·g = 0 and the other layer steps as if alone — empirical and true Fisher alike."""
    torch.manual_seed(0)
    main, aux = nn.Linear(3, 2).to(F64), nn.Linear(3, 5).to(F64)
    net = nn.ModuleList([main, aux])
    X, Y = torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 1, 0])
    ce = nn.functional.cross_entropy

    def closure(model, extra=None):
        if extra is not None:
            extra(X)  # computed, not used
        if fisher == "true":
            return model(X), Y
        return ce(model(X), Y, reduction="none")

    before = _flat(aux.parameters())
    ref = nn.Linear(3, 2).to(F64)
    ref.load_state_dict(main.state_dict())

    def make(params, **kwargs):
        return FisherNewton(params, fisher=fisher, generator=torch.Generator().manual_seed(1),
                            **kwargs)  # fmt: skip

    make(ref.parameters()).step(lambda: closure(ref))
    opt = make(net.parameters(), module=net if use_module else None)
    opt.step(lambda: closure(main, aux))
    assert torch.equal(_flat(aux.parameters()), before)
    got, want = _flat(main.parameters()), _flat(ref.parameters())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


# ---- FisherNewton: the true Fisher -------------------------------------------------------------


def test_true_fisher_cross_entropy_step_uses_labels_sampled_from_the_model():
    """fisher="true", cross-entropy: D from labels drawn as multinomial(softmax(logits)) with the
    optimizer's generator, g and the returned loss from the data labels (fixed damping)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(F64)
    X, Y = 4 * torch.randn(16, 3, dtype=F64), torch.randint(0, 4, (16,))
    with torch.no_grad():
        logits = model(X)

    def draw(probs):
        return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)

    sampled = draw(logits.softmax(-1))
    assert not torch.equal(sampled, Y)  # the model's labels differ from the data's here
    assert not torch.equal(sampled, draw(logits.softmax(0)))  # and the softmax axis matters
    ce = nn.functional.cross_entropy
    Jm = _per_sample_jacobian(model, lambda s: ce(model(X[s : s + 1]), sampled[s : s + 1]), 16)
    Jd = _per_sample_jacobian(model, lambda s: ce(model(X[s : s + 1]), Y[s : s + 1]), 16)
    x0 = _flat(model.parameters())
    alpha, lr = 0.05, 0.7
    expected = x0 - lr * torch.linalg.solve(Jm.T @ Jm / 16 + alpha * torch.eye(16, dtype=F64),
                                            Jd.mean(0))  # fmt: skip
    opt = FisherNewton(model.parameters(), lr=lr, damping=alpha, damping_mode="fixed",
                       fisher="true", generator=torch.Generator().manual_seed(5))  # fmt: skip
    loss = opt.step(lambda: (model(X), Y))
    torch.testing.assert_close(loss, ce(logits, Y), rtol=1e-14, atol=0)
    got = _flat(model.parameters())
    assert (got - expected).norm() / (expected - x0).norm() < 1e-10


def test_true_fisher_mse_step_uses_gaussian_labels_around_the_prediction():
    """fisher="true", mse: ℓ_s = ½‖φ_s − b_s‖², D from labels φ_s + ε_s, ε ~ N(0, I) drawn with
    the optimizer's generator in the predictions' shape: ∇ of the model loss is −ε_sᵀ ∂φ_s."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(F64)
    X, T = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    Jm = _per_sample_jacobian(model, lambda s: -(eps[s] * model(X[s])).sum(), 5)
    Jd = _per_sample_jacobian(model, lambda s: 0.5 * ((model(X[s]) - T[s]) ** 2).sum(), 5)
    x0 = _flat(model.parameters())
    with torch.no_grad():
        f0 = 0.5 * ((model(X) - T) ** 2).sum(1).mean()
    alpha, lr = 0.2, 0.9
    expected = x0 - lr * torch.linalg.solve(Jm.T @ Jm / 5 + alpha * torch.eye(8, dtype=F64),
                                            Jd.mean(0))  # fmt: skip
    opt = FisherNewton(model.parameters(), lr=lr, damping=alpha, damping_mode="fixed",
                       loss_type="mse", fisher="true",
                       generator=torch.Generator().manual_seed(9))  # fmt: skip
    loss = opt.step(lambda: (model(X), T.reshape(5, 2, 1)))  # targets: any shape of φ's size
    torch.testing.assert_close(loss, f0, rtol=1e-14, atol=0)
    got = _flat(model.parameters())
    assert (got - expected).norm() / (expected - x0).norm() < 1e-10


def test_true_fisher_non_finite_logits_skip_the_step_without_error():
    """A non-finite logit row cannot be sampled from: the step is skipped (counted), nothing
    raises, and the next finite step is the normal one."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(F64)
    X, Y = torch.randn(6, 3, dtype=F64), torch.tensor([0, 1, 2, 3, 1, 0])
    opt = FisherNewton(model.parameters(), fisher="true")
    x0 = _flat(model.parameters())
    bad = X.clone()
    bad[2, 0] = float("nan")
    opt.step(lambda: (model(bad), Y))
    assert torch.equal(_flat(model.parameters()), x0)
    assert opt.counters()["skipped_steps"] == 1


# ---- FisherNewton: per-sample rows from layer inputs and output gradients ----------------------


def _loop_rows(layer: nn.Module, A: torch.Tensor, T: torch.Tensor) -> list[torch.Tensor]:
    """Row s of each parameter is ∇ of ℓ_s = <T_s, layer(A_s)>, one backward per sample."""
    params = [p for p in (layer.weight, getattr(layer, "bias", None)) if p is not None]
    per = [
        torch.autograd.grad((layer(A[s : s + 1]) * T[s : s + 1]).sum(), params)
        for s in range(A.shape[0])
    ]
    return [torch.stack(gs) for gs in zip(*per)]


def _layer_cases():
    torch.manual_seed(0)
    B = 3
    yield "linear-seq", nn.Linear(4, 3).to(F64), torch.randn(B, 5, 4, dtype=F64)
    yield (
        "linear-seq2-nobias",
        nn.Linear(4, 2, bias=False).to(F64),
        torch.randn(B, 2, 3, 4, dtype=F64),
    )
    yield "linear-2d", nn.Linear(4, 3).to(F64), torch.randn(B, 4, dtype=F64)
    for shape, A in [((6,), torch.randn(B, 6)), ((6,), torch.randn(B, 4, 6)),
                     ((2, 3), torch.randn(B, 5, 2, 3))]:  # fmt: skip
        ln = nn.LayerNorm(shape, eps=0.5).to(F64)  # eps far from the default: it must be used
        with torch.no_grad():
            ln.weight.normal_()
            ln.bias.normal_()
        yield f"layernorm-{A.dim()}d", ln, A.to(F64)
    ln = nn.LayerNorm(6, bias=False).to(F64)
    yield "layernorm-nobias", ln, torch.randn(B, 6, dtype=F64)
    emb = nn.Embedding(7, 3, padding_idx=2).to(F64)
    yield "embedding-pad", emb, torch.tensor([[1, 2, 1, 5], [2, 2, 0, 6], [3, 1, 4, 1]])
    yield "embedding-1d", nn.Embedding(5, 2).to(F64), torch.tensor([4, 0, 4])
    yield (
        "conv-valid",
        nn.Conv2d(2, 3, 2, padding="valid").to(F64),
        torch.randn(B, 2, 4, 5, dtype=F64),
    )


@pytest.mark.parametrize(
    "name,layer,A", list(_layer_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_layer_rows_equal_per_sample_gradients(name, layer, A):
    """layer_rows(layer, A, D), D the output gradient of Σ_s ℓ_s, is each sample's own gradient
    (sequence Linear sums over positions, LayerNorm over its non-normalised dims, Embedding
    scatters with repeated indices and zeroes padding_idx's row)."""
    T = torch.randn(layer(A).shape, dtype=F64)
    want = _loop_rows(layer, A, T)
    got = fn.layer_rows(layer, A, T)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


class _SeqNet(nn.Module):
    """Embedding → LayerNorm → sequence Linear → mean over positions → Linear: every parameter
    in a layer whose rows come from layer_rows or LinearRows (no batched backward needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4, eps=0.1)
        self.seq = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, idx):
        h = torch.tanh(self.seq(self.norm(self.emb(idx))))
        return self.head(h.mean(1))


def _seq_step(use_module: bool):
    torch.manual_seed(0)
    net = _SeqNet().to(F64)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 9, (6, 5), generator=gen)
    Y = torch.randint(0, 3, (6,), generator=gen)
    x0 = _flat(net.parameters())
    opt = FisherNewton(net.parameters(), lr=0.5, damping=0.3, module=net if use_module else None)
    opt.step(lambda: nn.functional.cross_entropy(net(idx), Y, reduction="none"))
    return net, idx, Y, x0, _flat(net.parameters())


def test_sequence_model_rows_from_layers_equal_dense_step(monkeypatch):
    """With module= every layer of an Embedding/LayerNorm/sequence-Linear model takes its rows
    from its inputs and output gradients (the batched backward is never called) and the step is
    the dense relative-damping step c(D + cI)⁻¹g·lr, c = damping·tr(D)/B."""
    net, idx, Y, x0, _ = _seq_step(False)
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())

    def loss_s(z, s):
        split = torch.split(z, [p.numel() for p in params])
        ps = {n: t.view(p.shape) for n, t, p in zip(names, split, params)}
        out = torch.func.functional_call(net, ps, (idx[s : s + 1],))
        return nn.functional.cross_entropy(out, Y[s : s + 1])

    J = torch.stack([torch.func.grad(loss_s)(x0, s) for s in range(6)])
    D = J.T @ J / 6
    c = 0.3 * torch.trace(D) / 6
    expected = x0 - 0.5 * c * torch.linalg.solve(D + c * torch.eye(len(x0), dtype=F64), J.mean(0))

    def refuse(*args, **kwargs):
        raise AssertionError("the batched backward was used for a layer with its own rows")

    monkeypatch.setattr(fn, "per_sample_grads", refuse)
    _, _, _, _, fast = _seq_step(True)
    assert (fast - expected).norm() / (expected - x0).norm() < 1e-10


class _EmbConvNet(nn.Module):
    """1-D indices → Embedding → 4×4 image → Conv2d ("valid") → Linear without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 16)
        self.conv = nn.Conv2d(1, 2, 3, padding="valid")
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, idx):
        img = torch.tanh(self.emb(idx)).view(-1, 1, 4, 4)
        return self.head(torch.tanh(self.conv(img)).flatten(1))


def test_embedding_conv_and_biasless_linear_rows_equal_dense_fixed_step(monkeypatch):
    """module= on 1-D Embedding indices, a Conv2d and a bias-free Linear: no batched backward,
    and the step is x − lr (D + αI)⁻¹ g (fixed damping) with D, g from a loop over samples."""
    torch.manual_seed(0)
    net = _EmbConvNet().to(F64)
    idx, Y = torch.tensor([0, 3, 1, 3, 4, 2]), torch.tensor([0, 2, 1, 1, 0, 2])
    ce = nn.functional.cross_entropy
    J = _per_sample_jacobian(net, lambda s: ce(net(idx[s : s + 1]), Y[s : s + 1]), 6)
    x0 = _flat(net.parameters())
    alpha, lr = 0.1, 0.6
    eye = torch.eye(len(x0), dtype=F64)
    expected = x0 - lr * torch.linalg.solve(J.T @ J / 6 + alpha * eye, J.mean(0))

    def refuse(*args, **kwargs):
        raise AssertionError("the batched backward was used for a layer with its own rows")

    monkeypatch.setattr(fn, "per_sample_grads", refuse)
    opt = FisherNewton(net.parameters(), lr=lr, damping=alpha, damping_mode="fixed", module=net)
    opt.step(lambda: ce(net(idx), Y, reduction="none"))
    got = _flat(net.parameters())
    assert (got - expected).norm() / (expected - x0).norm() < 1e-10


class _TokenNet(nn.Module):
    """A class token looked up by a 0-d index and a position embedding on (1, L) (shared by
    the batch: materialised rows), token embeddings and a Linear head (rows from the layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Embedding(1, 3)
        self.pos = nn.Embedding(4, 3)
        self.tok = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, idx):
        c = self.cls(torch.tensor(0))
        p = self.pos(torch.arange(idx.shape[1])[None])
        return self.head(torch.tanh(self.tok(idx) + p + c).mean(1))


def test_layers_without_per_sample_inputs_fall_back_alone(monkeypatch):
    """Layers whose input is not per-sample (a 0-d index, a (1, L) position index) take the
    batched backward; the layers after them still take their rows from inputs and output
    gradients; the step is the dense fixed-damping step."""
    torch.manual_seed(0)
    net = _TokenNet().to(F64)
    idx, Y = torch.tensor([[0, 5, 2, 2], [1, 1, 3, 4], [5, 0, 0, 2]]), torch.tensor([1, 0, 1])
    ce = nn.functional.cross_entropy
    J = _per_sample_jacobian(net, lambda s: ce(net(idx[s : s + 1]), Y[s : s + 1]), 3)
    x0 = _flat(net.parameters())
    expected = x0 - 0.5 * torch.linalg.solve(J.T @ J / 3 + 0.2 * torch.eye(len(x0), dtype=F64),
                                             J.mean(0))  # fmt: skip
    seen = []
    original = fn.per_sample_grads

    def recording(losses, params, **kwargs):
        seen.extend(params)
        return original(losses, params, **kwargs)

    monkeypatch.setattr(fn, "per_sample_grads", recording)
    opt = FisherNewton(net.parameters(), lr=0.5, damping=0.2, damping_mode="fixed", module=net)
    opt.step(lambda: ce(net(idx), Y, reduction="none"))
    assert {id(p) for p in seen} == {id(net.cls.weight), id(net.pos.weight)}
    got = _flat(net.parameters())
    assert (got - expected).norm() / (expected - x0).norm() < 1e-10


@pytest.mark.parametrize("kw", [dict(sparse=True), dict(max_norm=0.5)], ids=str)
def test_sparse_and_max_norm_embeddings_take_their_rows_from_the_layer(kw, monkeypatch):
    """Embedding(sparse=True) (whose sparse gradient the batched backward cannot vmap) and
    Embedding(max_norm=...) give the step of the plain embedding, without a batched backward."""
    idx, Y = torch.tensor([0, 3, 1, 3, 4]), torch.tensor([0, 1, 1, 0, 1])

    def run(as_plain: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(5, 3, **kw), nn.Linear(3, 2)).to(F64)
        with torch.no_grad():  # max_norm renormalises in the forward: once, before both runs
            net(idx)
        if as_plain:
            plain = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)).to(F64)
            plain.load_state_dict(net.state_dict())
            net = plain
        opt = FisherNewton(net.parameters(), module=net)
        opt.step(lambda: nn.functional.cross_entropy(net(idx), Y, reduction="none"))
        return _flat(net.parameters())

    want = run(as_plain=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the batched backward was used for an Embedding")

    monkeypatch.setattr(fn, "per_sample_grads", refuse)
    torch.testing.assert_close(run(as_plain=False), want, rtol=1e-13, atol=1e-15)


def test_linear_rows_equal_materialised_rows_with_and_without_bias():
    """LinearRows (implicit ∇W_s = δ_s a_sᵀ, ∇b_s = δ_s): Gram, J·v and Jᵀa as the materialised
    per-sample gradients, one entry per parameter."""
    torch.manual_seed(0)
    A, D = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    a = torch.randn(4, dtype=F64)
    for bias in (True, False):
        layer = nn.Linear(3, 2, bias=bias).to(F64)
        params = list(layer.parameters())
        rows = [D[:, :, None] * A[:, None, :]] + ([D] if bias else [])
        ref = fn.PerSampleRows(params, rows)
        fast = fn.LinearRows(params, A, D)
        v = [torch.randn_like(p) for p in params]
        for got, want in [(fast.gram(), ref.gram()), (fast.jvp(v), ref.jvp(v)),
                          (fast.vjp(a), ref.vjp(a))]:  # fmt: skip
            assert len(got) == len(want) == len(params)
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)


def test_rows_gather_keeps_the_parameters_and_stacks_the_gathered_rows():
    """gather(f) applies f to the block's row tensors (LinearRows: inputs and output gradients)
    and keeps the block's kind and parameters: a doubled batch doubles the Gram's blocks."""
    torch.manual_seed(0)
    twice = lambda ts: [torch.cat([t, t]) for t in ts]  # noqa: E731
    lin = nn.Linear(3, 2).to(F64)
    conv = nn.Conv2d(2, 3, 2).to(F64)
    blocks = [
        fn.PerSampleRows(list(lin.parameters()),
                         [torch.randn(4, 2, 3, dtype=F64), torch.randn(4, 2, dtype=F64)]),
        fn.LinearRows(list(lin.parameters()), torch.randn(4, 3, dtype=F64),
                      torch.randn(4, 2, dtype=F64)),
        fn.Conv2dRows.from_layer(conv, torch.randn(4, 2, 3, 3, dtype=F64),
                                 torch.randn(4, 3, 2, 2, dtype=F64)),
    ]  # fmt: skip
    for blk in blocks:
        big = blk.gather(twice)
        assert type(big) is type(blk) and big.params == blk.params and big.batch == 8
        for small, large in zip(blk.gram(), big.gram()):
            torch.testing.assert_close(large, small.repeat(2, 2), rtol=1e-14, atol=1e-14)


def test_fisher_layer_rows_under_autocast_are_in_the_parameters_dtype(monkeypatch):
    """bfloat16 autocast: the captured layer inputs and output gradients are cast to the
    parameters' dtype (float32) before the rows are formed."""
    seen = []

    class Recording(fn.LinearRows):
        def __init__(self, params, A, D):
            seen.append((A.dtype, D.dtype))
            super().__init__(params, A, D)

    monkeypatch.setattr(fn, "LinearRows", Recording)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, Y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(net(X), Y, reduction="none")

    FisherNewton(net.parameters(), module=net).step(closure)
    assert seen == [(torch.float32, torch.float32)] * 2
    assert torch.isfinite(_flat(net.parameters())).all()


# ---- FisherNewton: what the user is told -------------------------------------------------------


def test_fisher_refusals_say_exactly_what_is_wrong():
    model, X, Y = _mlp()
    ce = nn.functional.cross_entropy
    opt = FisherNewton(model.parameters())
    assert _raises(CurvatureError, opt.step) == (
        "FisherNewton needs per-sample losses: opt.step(closure) with a closure that returns the "
        "1-D tensor of per-sample losses (reduction='none') without calling backward()."
    )
    assert _raises(CurvatureError, lambda: opt.step(lambda: ce(model(X[:0]), Y[:0],
                                                            reduction="none"))) == (
        "FisherNewton: the batch is empty (B = 0); there is nothing to fit"
    )  # fmt: skip
    assert _raises(CurvatureError, lambda: opt.step(lambda: ce(model(X), Y))) == (
        "FisherNewton: the closure must return a 1-D tensor of per-sample losses (use "
        "reduction='none'), got ()"
    )
    assert _raises(CurvatureError, lambda: opt.step(lambda: [ce(model(X), Y)])).endswith("got list")
    assert _raises(CurvatureError, lambda: opt.step(
        lambda: ce(model(X), Y, reduction="none").detach())) == (
        "FisherNewton: the per-sample losses carry no graph; return them without calling "
        "backward() and without detaching"
    )  # fmt: skip

    def backward_closure():
        loss = ce(model(X), Y, reduction="none")
        loss.mean().backward()
        return loss

    assert _raises(CurvatureError, lambda: opt.step(backward_closure)) == (
        "FisherNewton: the closure called backward(); return the per-sample losses "
        "(reduction='none') without calling backward — the optimizer differentiates them"
    )
    true = FisherNewton(model.parameters(), fisher="true")
    message = (
        "fisher='true': the closure must return (outputs, targets) — logits and class indices "
        "for cross_entropy, predictions and values for mse"
    )
    assert _raises(CurvatureError, lambda: true.step(lambda: model(X))) == message
    assert _raises(CurvatureError, lambda: true.step(lambda: (model(X), Y, Y))) == message


def test_fisher_refuses_batchnorm_in_training_mode_naming_the_layer():
    tail = (
        "is in training mode, which mixes the samples of a batch, so per-sample gradients are "
        "not defined. Put the BatchNorm layers in eval mode (layer.eval()), or use GroupNorm "
        "or LayerNorm."
    )
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(F64)
    X, Y = torch.randn(6, 3, dtype=F64), torch.tensor([0, 1, 0, 1, 1, 0])
    closure = lambda: nn.functional.cross_entropy(net(X), Y, reduction="none")  # noqa: E731
    opt = FisherNewton(net.parameters(), module=net)
    assert _raises(CurvatureError, lambda: opt.step(closure)) == (
        f"FisherNewton: 1 (BatchNorm1d) {tail}"
    )
    bn = nn.BatchNorm1d(3).to(F64)
    opt = FisherNewton(bn.parameters(), module=bn)
    assert _raises(CurvatureError, lambda: opt.step(lambda: bn(X).sum(1))) == (
        f"FisherNewton: the module (BatchNorm1d) {tail}"
    )
    net[1].eval()
    x0 = _flat(net.parameters())
    FisherNewton(net.parameters(), module=net).step(closure)  # eval mode: accepted
    assert not torch.equal(_flat(net.parameters()), x0)


def test_fisher_group_refusals_say_exactly_what_is_wrong():
    w = torch.zeros(2, dtype=F64, requires_grad=True)
    v = torch.zeros(3, dtype=F64, requires_grad=True)
    fixed = dict(damping_mode="fixed", damping=0.1)
    assert _raises(ValueError, lambda: FisherNewton(
        [{"params": [w], "damping": 0.0}, {"params": [v]}], **fixed)) == (
        "param group damping must be > 0.0, got 0.0")  # fmt: skip
    theory = dict(damping_mode="theory", hessian_lipschitz=1.0)
    FisherNewton([{"params": [w], "damping": 0.0}, {"params": [v]}], **theory)  # α > 0 anyway
    v32 = torch.zeros(3, requires_grad=True)
    assert _raises(TypeError, lambda: FisherNewton([w, v32])) == (
        "FisherNewton needs every parameter in one dtype (the per-sample rows of all layers "
        "enter one B×B Gram matrix), got ['torch.float32', 'torch.float64']")  # fmt: skip


# ---- FisherNewton under FSDP2 (one process: the sharded code path, shards = whole tensors) -----


@pytest.fixture
def fsdp_one():
    """A one-process gloo group and a 1-D CPU mesh for fully_shard, torn down after the test."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("gloo unavailable or a process group is already initialised")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    try:
        yield lambda m: fully_shard(m, mesh=mesh)
    finally:
        dist.destroy_process_group()


def test_fisher_sharded_step_equals_dense_formula(fsdp_one):
    """FSDP2 parameters (DTensors): g and the direction from the gathered layer rows — the
    dense relative-damping step, and the mean loss returned."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False).to(F64)  # one parameter tensor
    X, Y = torch.randn(6, 3, dtype=F64), torch.tensor([0, 1, 3, 2, 1, 0])
    ce = nn.functional.cross_entropy
    J = _per_sample_jacobian(model, lambda s: ce(model(X[s : s + 1]), Y[s : s + 1]), 6)
    x0 = _flat(model.parameters())
    with torch.no_grad():
        f0 = ce(model(X), Y)
    D = J.T @ J / 6
    c = 0.8 * torch.trace(D) / 6
    expected = x0 - 0.5 * c * torch.linalg.solve(D + c * torch.eye(12, dtype=F64), J.mean(0))
    fsdp_one(model)
    opt = FisherNewton(model.parameters(), lr=0.5, damping=0.8, module=model)
    loss = opt.step(lambda: ce(model(X), Y, reduction="none"))
    assert opt._layout.kind == "shards"
    got = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    assert (got - expected).norm() / (expected - x0).norm() < 1e-12
    torch.testing.assert_close(loss, f0, rtol=1e-14, atol=0)


def test_fisher_sharded_refusals_say_exactly_what_is_wrong(fsdp_one):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.gain = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.gain

    X, Y = torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 1, 0])
    ce = nn.functional.cross_entropy
    model = fsdp_one(Scaled().to(F64))
    opt = FisherNewton(model.parameters(), module=model)
    assert _raises(CurvatureError, lambda: opt.step(
        lambda: ce(model(X), Y, reduction="none"))) == (
        "FisherNewton under FSDP2 takes per-sample gradients from layer inputs and output "
        "gradients only (module= with nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding layers "
        "called once per step); 1 parameter(s) are not in such a layer, and the batched "
        "backward cannot reach sharded parameters")  # fmt: skip
    lin = fsdp_one(nn.Linear(3, 2).to(F64))
    opt = FisherNewton(lin.parameters(), module=lin, fisher="true")
    assert _raises(CurvatureError, lambda: opt.step(lambda: (lin(X), Y))) == (
        "FisherNewton: fisher='true' needs the data-label gradient by autograd.grad, which does "
        "not reach FSDP2's sharded parameters; use fisher='empirical'")  # fmt: skip


# ---- FisherNewton over two data-parallel replicas (the second rank simulated) ------------------


@pytest.mark.parametrize("layer_rows", [False, True])
def test_fisher_two_replicas_with_unequal_batches_step_on_the_union_batch(layer_rows, monkeypatch):
    """Rank 0 holds 1 sample, (simulated) rank 1 holds 5: the per-sample rows are gathered in
    rank order over the optimizer's group (rank 0's padded to 5 and cut back), g and the loss are
    the union batch's means (each rank's weighted by B_r·world/ΣB before the mean over ranks),
    and the step is the dense relative-damping step of the 6-sample union batch. Without
    module=, the rows of an MLP's four tensors; with it, a Linear layer's inputs and output
    gradients."""
    import torch.distributed as dist

    from torch_rankone.optim._data_parallel import Layout

    torch.manual_seed(0)
    if layer_rows:
        model = nn.Linear(3, 2).to(F64)
    else:
        model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).to(F64)
    X, Y = torch.randn(6, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1, 0])
    ce = nn.functional.cross_entropy
    J = _per_sample_jacobian(model, lambda s: ce(model(X[s : s + 1]), Y[s : s + 1]), 6)
    with torch.no_grad():
        losses = ce(model(X), Y, reduction="none")
    x0 = _flat(model.parameters())
    D = J.T @ J / 6
    c = 1.5 * torch.trace(D) / 6
    eye = torch.eye(len(x0), dtype=F64)
    expected = x0 - 0.7 * c * torch.linalg.solve(D + c * eye, J.mean(0))
    rows = J[1:]
    if layer_rows:  # the layer's input a_s and output gradient δ_s = softmax − one-hot
        with torch.no_grad():
            delta = model(X[1:]).softmax(-1) - nn.functional.one_hot(Y[1:], 2)
        rows = torch.cat([X[1:], delta], 1)
    other = {
        "size": torch.tensor([5]),
        "rows": rows,
        "g": J[1:].mean(0) * (2 * 5 / 6),
        "loss": losses[1:].mean() * (2 * 5 / 6),
    }
    pg = object()  # the optimizer's process group: every collective must use it

    def get_world_size(group=None):
        assert group is pg
        return 2

    def all_gather(parts, tensor, group=None):
        assert group is pg
        key = "size" if tensor.dtype == torch.int64 else "rows"
        assert tensor.shape == other[key].shape  # equal shapes: rank 0's rows padded
        parts[0].copy_(tensor)
        parts[1].copy_(other[key])

    def all_reduce(buf, group=None, **kwargs):
        assert group is pg
        buf.add_(other["loss"] if buf.numel() == 1 else other["g"])

    monkeypatch.setattr(dist, "get_world_size", get_world_size)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    opt = FisherNewton(
        model.parameters(), lr=0.7, damping=1.5, module=model if layer_rows else None
    )
    opt._layout, opt._seed_synced = Layout("replicas", pg), True
    loss = opt.step(lambda: ce(model(X[:1]), Y[:1], reduction="none"))
    got = _flat(model.parameters())
    assert (got - expected).norm() / (expected - x0).norm() < 1e-12
    torch.testing.assert_close(loss, losses.mean(), rtol=1e-14, atol=0)


# ---- Constructors: defaults and refusals ------------------------------------------------------


_W = torch.zeros(2, dtype=F64, requires_grad=True)
_ISO = dict(preconditioner="isotropic")
_REFUSALS = [
    (RankOneNewton, dict(lr=-1.0), "lr must be >= 0.0, got -1.0"),
    (RankOneNewton, dict(damping=-1.0), "damping must be >= 0.0, got -1.0"),
    (RankOneNewton, dict(delta=float("nan")), "delta must be a finite number, got nan"),
    (RankOneNewton, dict(beta2=-0.5), "beta2 must be >= 0.0, got -0.5"),
    (RankOneNewton, dict(init_probes=0), "init_probes must be an integer >= 1, got 0"),
    (RankOneNewton, dict(lambda_max_refresh=0),
     "lambda_max_refresh must be an integer >= 1, got 0"),
    (RankOneNewton, dict(lambda_max=0.0, **_ISO), "lambda_max must be > 0.0, got 0.0"),
    (RankOneNewton, dict(damping_mode="theory", **_ISO),
     "damping_mode='theory' needs hessian_lipschitz (M)"),
    (RankOneNewton, dict(damping_mode="theory", hessian_lipschitz=0.0, **_ISO),
     "hessian_lipschitz must be > 0.0, got 0.0"),
    (RankOneNewton, dict(damping_mode="theory", hessian_lipschitz=1.0),
     "damping_mode='theory' is the isotropic method's (preconditioner='isotropic')"),
    (NeumannIHVP, dict(lr=-1.0), "lr must be >= 0.0, got -1.0"),
    (NeumannIHVP, dict(damping=0.0), "damping must be > 0.0, got 0.0"),
    (NeumannIHVP, dict(damping_mode="fixed", damping=-1.0), "damping must be >= 0.0, got -1.0"),
    (NeumannIHVP, dict(num_terms=0), "num_terms must be an integer >= 1, got 0"),
    (NeumannIHVP, dict(scale_refresh=0), "scale_refresh must be an integer >= 1, got 0"),
    (NeumannIHVP, dict(damping_mode="fixed", scale=0.0), "scale must be > 0.0, got 0.0"),
    (NeumannIHVP, dict(scale=1.0), "scale is estimated in damping_mode='relative'; pass "
     "damping_mode='fixed' to give it"),
    (NeumannIHVP, dict(damping_mode="x"), "damping_mode must be 'relative' or 'fixed', got 'x'"),
    (FisherNewton, dict(lr=-1.0), "lr must be >= 0.0, got -1.0"),
    (FisherNewton, dict(damping=-1.0), "damping must be >= 0.0, got -1.0"),
    (FisherNewton, dict(damping_mode="fixed", damping=0.0), "FisherNewton needs damping > 0 in "
     "fixed mode: D has rank ≤ B < N, so D + αI is singular at α = 0"),
    (FisherNewton, dict(f_star=-1.0), "f_star must be >= 0.0, got -1.0"),
    (FisherNewton, dict(max_grad_norm=0.0), "max_grad_norm must be > 0.0, got 0.0"),
    (FisherNewton, dict(damping_mode="x"),
     "damping_mode must be one of ('relative', 'fixed', 'theory'), got 'x'"),
    (FisherNewton, dict(damping_mode="theory"),
     "damping_mode='theory' needs hessian_lipschitz (M)"),
    (FisherNewton, dict(damping_mode="theory", hessian_lipschitz=0.0),
     "hessian_lipschitz must be > 0.0, got 0.0"),
    (FisherNewton, dict(damping_mode="theory", hessian_lipschitz=1.0, loss_type="mse"),
     "damping_mode='theory' with loss_type='mse' needs smoothness (L)"),
    (FisherNewton, dict(damping_mode="theory", hessian_lipschitz=1.0, loss_type="mse",
                        smoothness=0.0), "smoothness must be > 0.0, got 0.0"),
]  # fmt: skip


@pytest.mark.parametrize("cls,kwargs,message", _REFUSALS, ids=lambda v: str(v)[:40])
def test_constructor_refusals_say_exactly_what_is_wrong(cls, kwargs, message):
    assert _raises(ValueError, lambda: cls([_W], **kwargs)) == message


def test_constructor_defaults_are_the_documented_ones():
    group = "marker"  # any object: the optimizers keep the group they are given
    r1 = RankOneNewton([_W], process_group=group).defaults
    assert (r1["lr"], r1["damping"], r1["init_probes"], r1["lambda_max_refresh"]) == (
        0.1, 1e-8, 10, 100)  # fmt: skip
    assert RankOneNewton([_W], damping_mode="fixed").defaults["damping"] == 1e-3
    assert RankOneNewton([_W], **_ISO).defaults["damping"] == 4.0
    assert RankOneNewton([_W], rank=8).defaults["rank"] == 8  # the compiled ops' largest
    neu = NeumannIHVP([_W], momentum=0.5).defaults
    assert (neu["lr"], neu["damping"], neu["num_terms"], neu["scale_refresh"]) == (
        1.0,
        1.0,
        10,
        100,
    )
    assert neu["momentum"] == 0.5 and neu["damping_mode"] == "relative"
    assert NeumannIHVP([_W], damping_mode="fixed").defaults["damping"] == 0.0
    fisher = FisherNewton([_W], process_group=group)
    assert (fisher.defaults["lr"], fisher.defaults["damping"], fisher.defaults["f_star"]) == (
        1.0, 2.0, 0.0)  # fmt: skip
    assert fisher.process_group == group
    assert FisherNewton([_W], damping_mode="fixed").defaults["damping"] == 1e-3
    theory = dict(damping_mode="theory", hessian_lipschitz=1.0)
    assert FisherNewton([_W], damping=0.0, **theory).defaults["damping"] == 0.0  # α > 0 anyway
    assert FisherNewton([_W], damping_mode="theory", hessian_lipschitz=1.0).defaults[
        "damping"] == 1e-3  # fmt: skip
