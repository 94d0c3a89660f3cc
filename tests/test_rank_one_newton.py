"""RankOneNewton (SPEC §4.1): one step against the dense formula, the curvature sources, the
optimizer protocol, and the slides' Lemma."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _optim_problems import F64, MLPProblem, PaperRankOneNewton, same_direction

from torch_rankone.optim import CurvatureError


def _dense_step(prob, x, u, lr, c, safeguard):
    """x − lr (S + c I)⁻¹ g with S = (N/2)(h uᵀ + u hᵀ), c raised to |μ₋| + c/2 when it fires."""
    H, g = prob.hessian(x), prob.grad(x)
    n = x.numel()
    h = H @ u
    S = (n / 2) * (torch.outer(h, u) + torch.outer(u, h))
    mu_minus = float(torch.linalg.eigvalsh(S)[0])  # S's only negative eigenvalue
    assert abs(mu_minus - (n / 2) * float(h @ u - h.norm())) < 1e-9 * abs(mu_minus)
    fired = safeguard and -mu_minus > c / 2
    c_used = -mu_minus + c / 2 if fired else c
    if fired:  # the smallest eigenvalue of S + c_used I is c/2
        assert abs(float(torch.linalg.eigvalsh(S)[0]) + c_used - c / 2) < 1e-9 * c_used
    y = torch.linalg.solve(S + c_used * torch.eye(n, dtype=F64), g)
    return x - lr * y, c_used, fired


@pytest.mark.parametrize(
    "damping,delta,safeguard,expect_fire",
    [
        (5.0, 0.5, False, False),
        (0.05, 0.1, False, False),  # indefinite D + αI, solved as written
        (10.0, 0.5, True, False),  # |μ₋| = 2.88 < c/2
        (5.0, 0.5, True, True),  # positive definite but c/2 < |μ₋| < c: raised
        (0.05, 0.1, True, True),  # indefinite: raised
    ],
)
def test_one_step_equals_dense_formula(damping, delta, safeguard, expect_fire):
    prob = MLPProblem()
    opt = PaperRankOneNewton(
        prob.params,
        lr=0.7,
        damping=damping,
        delta=delta,
        safeguard=safeguard,
        generator=torch.Generator().manual_seed(3),
    )
    u = same_direction(prob.params, 3)
    expected, c_used, fired = _dense_step(prob, prob.x0, u, 0.7, delta + damping, safeguard)
    assert fired == expect_fire
    loss = opt.step(prob.loss_closure())
    assert torch.allclose(loss, prob.f(prob.x0), rtol=1e-12)
    err = (prob.flat() - expected).norm() / (expected - prob.x0).norm()
    assert err < 1e-8
    assert abs(float(opt.global_state["damping"]) - c_used) < 1e-10 * c_used
    assert int(opt.global_state.get("safeguard_hits", torch.tensor(0))) == int(fired)


def test_safeguard_is_continuous_across_the_indefinite_boundary():
    """Just below and just above c = |μ₋| the steps agree (no jump to a near-singular system)."""
    H = torch.diag(torch.tensor([1.0, 0.1], dtype=F64))
    u = same_direction([torch.zeros(2, dtype=F64)], 0)
    h = H @ u
    mu_abs = -float(h @ u - h.norm())  # N/2 = 1

    def step_norm(c):
        x = torch.ones(2, dtype=F64, requires_grad=True)
        opt = PaperRankOneNewton([x], damping=c, generator=torch.Generator().manual_seed(0))
        opt.step(lambda: 0.5 * x @ H @ x)
        return float((x.detach() - 1).norm())

    below, above = step_norm(mu_abs * (1 - 1e-6)), step_norm(mu_abs * (1 + 1e-6))
    assert abs(below - above) < 1e-4 * below, (below, above)
    assert below < 100  # measured 29; the old rule (raise only when c ≤ |μ₋|) gave 1.4e7 above


def test_theory_damping_step_equals_dense_formula():
    prob = MLPProblem()
    M, lam, delta = 2.0, 0.8, 0.1
    opt = PaperRankOneNewton(
        prob.params,
        lr=1.0,
        delta=delta,
        damping_mode="theory",
        hessian_lipschitz=M,
        lambda_max=lam,
        generator=torch.Generator().manual_seed(5),
    )
    n = prob.x0.numel()
    alpha = math.sqrt(M * float(prob.grad(prob.x0).norm()) / 2) + math.sqrt(
        lam**2 * n * (n - 1) + n * delta**2
    )
    expected, _, _ = _dense_step(
        prob, prob.x0, same_direction(prob.params, 5), 1.0, delta + alpha, True
    )
    opt.step(prob.loss_closure())
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < 1e-8


def _run_one(prob, mode, hvp="auto", seed=7):
    prob.set(prob.x0)
    for p in prob.params:
        p.grad = None
    opt = PaperRankOneNewton(
        prob.params, lr=1.0, damping=0.5, hvp=hvp, generator=torch.Generator().manual_seed(seed)
    )
    if mode == "graph":
        prob.loss().backward(create_graph=True)
        loss = opt.step()
    elif mode == "loss_closure":
        loss = opt.step(prob.loss_closure())
    else:
        loss = opt.step(prob.backward_closure(opt))
    return prob.flat().clone(), loss, opt


def test_graph_and_loss_closure_give_the_same_step_and_fd_agrees():
    prob = MLPProblem()
    x_graph, loss_graph, opt = _run_one(prob, "graph")
    assert loss_graph is None
    for p in prob.params:  # the graph was dropped: .grad is the plain gradient
        assert p.grad is not None and not p.grad.requires_grad
    x_closure, _, _ = _run_one(prob, "loss_closure")
    assert torch.allclose(x_graph, x_closure, rtol=0, atol=1e-14)
    x_fd, loss_fd, _ = _run_one(prob, "backward")
    step = (x_graph - prob.x0).norm()
    # central differences: 1.2e-10 measured (a forward difference would be ~1e-5)
    assert (x_fd - x_graph).norm() / step < 1e-8
    assert torch.allclose(loss_fd, prob.f(prob.x0))
    x_fd2, _, _ = _run_one(prob, "loss_closure", hvp="fd")  # fd forced on a loss closure
    assert (x_fd2 - x_graph).norm() / step < 1e-8


def test_fd_restores_parameters_exactly_and_grad_holds_gradient():
    prob = MLPProblem()
    seen = []
    opt = PaperRankOneNewton(
        prob.params, lr=0.0, damping=0.5, generator=torch.Generator().manual_seed(1)
    )

    def closure():
        seen.append(prob.flat().clone())
        opt.zero_grad()
        loss = prob.loss()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(seen) == 3  # the loss, then x + εu and x − εu
    assert torch.equal(seen[0], prob.x0) and not torch.equal(seen[1], prob.x0)
    assert torch.equal(prob.flat(), prob.x0)  # lr = 0: bit-for-bit restored
    from torch_rankone._tensorlist import flatten

    g = flatten([p.grad for p in prob.params])
    assert torch.allclose(g, prob.grad(prob.x0), rtol=1e-12)  # not the shifted gradient


def test_source_errors_are_clear():
    prob = MLPProblem()
    opt = PaperRankOneNewton(prob.params, hvp="exact")
    with pytest.raises(
        CurvatureError, match="hvp='exact' cannot use a closure that calls backward"
    ):
        opt.step(prob.backward_closure(opt))
    opt2 = PaperRankOneNewton(prob.params)
    for p in prob.params:
        p.grad = None
    with pytest.raises(CurvatureError, match="create_graph=True"):
        opt2.step()
    prob.loss().backward()  # plain backward, no graph, no closure
    with pytest.raises(CurvatureError, match="no graph"):
        opt2.step()
    with pytest.raises(CurvatureError, match="without a graph"):
        opt2.step(lambda: prob.loss().detach())
    with pytest.raises(CurvatureError, match="needs a closure"):
        prob.loss().backward(create_graph=True)
        PaperRankOneNewton(prob.params, hvp="fd").step()
    assert torch.equal(prob.flat(), prob.x0)


def test_param_groups_with_their_own_lr_and_damping():
    prob = MLPProblem()
    w1, b1, w2, b2 = prob.params
    opt = PaperRankOneNewton(
        [{"params": [w1, b1], "lr": 0.5, "damping": 2.0}, {"params": [w2, b2]}],
        lr=1.0,
        damping=0.3,
        delta=0.1,
        safeguard=False,
        generator=torch.Generator().manual_seed(2),
    )
    x, n = prob.x0, prob.x0.numel()
    n1 = w1.numel() + b1.numel()
    u = same_direction(prob.params, 2)
    h = prob.hessian(x) @ u
    S = (n / 2) * (torch.outer(h, u) + torch.outer(u, h))
    lam = torch.cat([torch.full((n1,), 2.1, dtype=F64), torch.full((n - n1,), 0.4, dtype=F64)])
    lrs = torch.cat([torch.full((n1,), 0.5, dtype=F64), torch.ones(n - n1, dtype=F64)])
    expected = x - lrs * torch.linalg.solve(S + torch.diag(lam), prob.grad(x))
    opt.step(prob.loss_closure())
    assert (prob.flat() - expected).norm() / (expected - x).norm() < 1e-8


def test_non_finite_loss_or_gradient_leaves_everything_untouched():
    prob = MLPProblem()
    opt = PaperRankOneNewton(prob.params, lr=1.0, damping=0.5)
    opt.step(prob.loss_closure())
    x1, state1 = prob.flat().clone(), copy.deepcopy(opt.state_dict())
    opt.step(lambda: prob.loss() * float("nan"))
    assert torch.equal(prob.flat(), x1)
    assert int(opt.global_state["skipped_steps"]) == 1 and int(opt.global_state["step"]) == 1
    assert state1["state"][0]["safeguard_hits"] == opt.global_state["safeguard_hits"]
    # an inf in one gradient entry (graph mode)
    prob.loss().backward(create_graph=True)
    prob.params[0].grad = prob.params[0].grad * torch.tensor(float("inf"))
    opt.step()
    assert torch.equal(prob.flat(), x1) and int(opt.global_state["skipped_steps"]) == 2
    opt.step(prob.loss_closure())  # and it recovers
    assert not torch.equal(prob.flat(), x1) and int(opt.global_state["step"]) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(damping=float("nan")), "damping"),
        (dict(damping_mode="bogus"), "damping_mode"),
        (dict(damping_mode="theory"), "hessian_lipschitz"),
        (dict(hvp="maybe"), "hvp"),
        (dict(damping=0.0, delta=0.0), "safeguard=True needs"),
        (dict(lambda_max=-2.0), "lambda_max"),
    ],
)
def test_hyperparameter_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PaperRankOneNewton(MLPProblem().params, **kwargs)


def test_non_uniform_options_across_groups_are_refused():
    w1, b1, w2, b2 = MLPProblem().params
    with pytest.raises(ValueError, match="same for all parameter groups"):
        PaperRankOneNewton([{"params": [w1, b1], "safeguard": False}, {"params": [w2, b2]}])


# ----------------------------------------------------------------------------- the slides' Lemma


def _lemma_K(f0_gap, M, sigma, eps, g0):
    """Formula (3) of the slides."""
    return math.ceil(
        8 * f0_gap * (math.sqrt(M / 2) / eps**1.5 + sigma / eps**2) + 2 * math.log(g0 / 2)
    )


def test_lemma_on_the_one_dimensional_example():
    """f(x) = log cosh(x) + x²/20: f'' ∈ [0.1, 1.1] > 0, |f'''| ≤ 4/(3√3) = M, f* = 0."""
    M, lam_max, delta, eps = 4 / (3 * math.sqrt(3)), 1.1, 0.0, 1e-4
    x = torch.tensor([2.5], dtype=F64, requires_grad=True)
    f = lambda t: torch.log(torch.cosh(t)).sum() + (t**2).sum() / 20  # noqa: E731
    opt = PaperRankOneNewton(
        [x], damping_mode="theory", hessian_lipschitz=M, lambda_max=lam_max, delta=delta
    )
    sigma = math.sqrt(lam_max**2 * 1 * 0 + 1 * delta**2)
    g0 = float(torch.func.grad(f)(x.detach()).abs())
    K = _lemma_K(float(f(x.detach())), M, sigma, eps, g0)
    best, k = math.inf, 0
    while best > eps and k < K:
        k += 1
        opt.step(lambda: f(x))
        best = min(best, float(torch.func.grad(f)(x.detach()).abs()))
    assert best <= eps and k <= K, (best, k, K)  # measured: k = 6, K ≈ 1e7


def test_lemma_on_small_logistic_regression():
    """Convex, N = 3: M = sup|φ'''|·max‖a‖³ and λ_max from a bound on the Hessian."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 3, generator=gen, dtype=F64)
    b = torch.sign(torch.randn(40, generator=gen, dtype=F64))
    lam = 0.1
    f = lambda t: torch.nn.functional.softplus(-b * (A @ t)).mean() + lam / 2 * t @ t  # noqa: E731
    R = float(A.norm(dim=1).max())
    M = 1 / (6 * math.sqrt(3)) * R**3
    lam_max = float(torch.linalg.eigvalsh(A.T @ A / (4 * len(b)))[-1]) + lam  # sup over x
    n, eps = 3, 0.05
    sigma = lam_max * math.sqrt(n * (n - 1))
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    # f* from Newton's method
    z = torch.zeros(3, dtype=F64)
    for _ in range(30):
        z = z - torch.linalg.solve(torch.autograd.functional.hessian(f, z), torch.func.grad(f)(z))
    f_star = float(f(z))
    g0 = float(torch.func.grad(f)(x.detach()).norm())
    K = _lemma_K(float(f(x.detach())) - f_star, M, sigma, eps, g0)
    opt = PaperRankOneNewton(
        [x],
        damping_mode="theory",
        hessian_lipschitz=M,
        lambda_max=lam_max,
        generator=torch.Generator().manual_seed(1),
    )
    best, k = math.inf, 0
    while best > eps and k < K:
        k += 1
        opt.step(lambda: f(x))
        best = min(best, float(torch.func.grad(f)(x.detach()).norm()))
    assert best <= eps and k <= K, (best, k, K)  # measured: k = 4, K = 51


@pytest.mark.parametrize("split_lr", [False, True])
def test_shared_lr_and_damping_take_the_fused_update(monkeypatch, split_lr):
    """One ``lr`` and one ``c`` for all groups: one call of ``_ext.lowrank_solve_update`` (the
    compiled op when built — then the unfused reference must not run); else the per-group path.
    Both equal the dense formula."""
    from torch_rankone import _ext

    calls = []
    fused = _ext.lowrank_solve_update
    monkeypatch.setattr(_ext, "lowrank_solve_update", lambda *a: calls.append(1) or fused(*a))
    if _ext.has_extension():

        def forbidden(*args):
            raise AssertionError("the unfused reference ran although the extension is built")

        monkeypatch.setattr(_ext, "lowrank_solve_update_reference", forbidden)
    prob = MLPProblem()
    w1, b1, w2, b2 = prob.params
    lr2 = 0.5 if split_lr else 0.7
    opt = PaperRankOneNewton(
        [{"params": [w1, b1]}, {"params": [w2, b2], "lr": lr2}],
        lr=0.7,
        damping=0.4,
        delta=0.1,
        safeguard=False,
        generator=torch.Generator().manual_seed(5),
    )
    x, n, n1 = prob.x0, prob.x0.numel(), w1.numel() + b1.numel()
    u = same_direction(prob.params, 5)
    h = prob.hessian(x) @ u
    S = (n / 2) * (torch.outer(h, u) + torch.outer(u, h))
    lrs = torch.cat([torch.full((n1,), 0.7, dtype=F64), torch.full((n - n1,), lr2, dtype=F64)])
    expected = x - lrs * torch.linalg.solve(S + 0.5 * torch.eye(n, dtype=F64), prob.grad(x))
    opt.step(prob.loss_closure())
    assert len(calls) == (0 if split_lr else 1)
    assert (prob.flat() - expected).norm() / (expected - x).norm() < 1e-8


def test_theory_mode_refreshes_lambda_max_on_schedule():
    """``lambda_max=None``: ``|λ_max(H)|`` by power iteration at call 0 and every
    ``lambda_max_refresh`` calls (here 2), at the current point."""
    prob = MLPProblem()
    opt = PaperRankOneNewton(
        prob.params,
        damping_mode="theory",
        hessian_lipschitz=1.0,
        lambda_max_refresh=2,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for _ in range(3):
        top = float(torch.linalg.eigvalsh(prob.hessian(prob.flat())).abs().max())
        opt.step(prob.loss_closure())
        seen.append((float(opt.global_state["lambda_max"]), top))
    assert abs(seen[0][0] / seen[0][1] - 1) < 0.03  # 20 power iterations at x⁰
    assert seen[1][0] == seen[0][0]  # call 1: kept
    assert seen[2][0] != seen[1][0] and abs(seen[2][0] / seen[2][1] - 1) < 0.03  # call 2: anew
