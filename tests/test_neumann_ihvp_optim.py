"""NeumannIHVP (SPEC §4.3): one step against the dense truncated series, fallback on divergence,
protocol behaviour."""

from __future__ import annotations

import warnings

import pytest
import torch
from _optim_problems import F64, MLPProblem, PaperNeumannIHVP

from torch_rankone import NeumannIHVP


def _dense(prob, K, s, lam, lr):
    H, g = prob.hessian(prob.x0), prob.grad(prob.x0)
    n = len(g)
    M = torch.eye(n, dtype=F64) - (H + lam * torch.eye(n, dtype=F64)) / s
    y = sum(torch.linalg.matrix_power(M, j) for j in range(K + 1)) @ g / s
    return prob.x0 - lr * y, H


@pytest.mark.parametrize("mode", ["graph", "loss_closure", "fd"])
def test_one_step_equals_dense_truncated_series(mode):
    prob = MLPProblem()
    H = prob.hessian(prob.x0)
    lam = 0.5 - min(0.0, float(torch.linalg.eigvalsh(H)[0]))  # H + λI positive definite
    s = 1.2 * float(torch.linalg.eigvalsh(H)[-1] + lam)
    expected, _ = _dense(prob, 6, s, lam, 0.9)
    calls = []
    opt = PaperNeumannIHVP(
        prob.params, lr=0.9, damping=lam, num_terms=6, scale=s, hvp="fd" if mode == "fd" else "auto"
    )
    if mode == "graph":
        prob.loss().backward(create_graph=True)
        opt.step()
    elif mode == "loss_closure":
        opt.step(lambda: calls.append(1) or prob.loss())
    else:
        opt.step(prob.backward_closure(opt))
    tol = 1e-5 if mode == "fd" else 1e-10
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < tol
    assert int(opt.global_state["neumann_fallbacks"]) == 0
    if mode == "loss_closure":
        assert len(calls) == 1


def test_exactly_num_terms_hvps_per_step(monkeypatch):
    import torch_rankone.optim._protocol as protocol

    count = [0]
    original = protocol._exact_hvp_fn

    def counting(grads, params):
        fn = original(grads, params)
        return lambda v: (count.__setitem__(0, count[0] + 1), fn(v))[1]

    monkeypatch.setattr(protocol, "_exact_hvp_fn", counting)
    prob = MLPProblem()
    opt = PaperNeumannIHVP(prob.params, damping=1.0, num_terms=7, scale=50.0)
    opt.step(prob.loss_closure())
    assert count[0] == 7


def test_estimated_scale_refreshes_on_schedule():
    prob = MLPProblem()
    gen = torch.Generator().manual_seed(0)
    opt = PaperNeumannIHVP(prob.params, damping=1.0, num_terms=3, scale_refresh=2, generator=gen)
    opt.step(prob.loss_closure())
    top = float(torch.linalg.eigvalsh(prob.hessian(prob.x0) + torch.eye(37, dtype=F64))[-1])
    # 20 power iterations (tol 1e-3) from a random start: at most a few % low on this problem
    assert -0.03 < float(opt.global_state["scale"]) / (1.05 * top) - 1 < 1e-6
    s1 = float(opt.global_state["scale"])
    opt.step(prob.loss_closure())
    assert float(opt.global_state["scale"]) == s1  # not refreshed on call 1
    opt.step(prob.loss_closure())
    assert float(opt.global_state["scale"]) != s1  # refreshed on call 2 (new point)


def test_a_given_scale_below_lambda_max_converges_through_the_safe_fallback():
    """A user's ``scale`` far below ``λ_max`` (every step diverges): the fallback step is bounded
    by the Rayleigh quotients the series saw, so ``5x₀² + x₁²`` still goes to 0 (it reached
    5e76 in 60 steps with ``g/s``), and the user is told at the first sync point."""
    x = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    opt = NeumannIHVP([x], damping_mode="fixed", scale=0.5)
    with pytest.warns(RuntimeWarning, match="with a given scale, raise it"):
        for _ in range(2):
            opt.step(lambda: 5 * x[0] ** 2 + x[1] ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(58):
            opt.step(lambda: 5 * x[0] ** 2 + x[1] ** 2)
    assert float(x.detach().abs().max()) < 1e-6 and opt.counters()["skipped_steps"] == 0


def test_divergence_falls_back_to_damped_gradient_step_and_warns():
    prob = MLPProblem()
    H, g = prob.hessian(prob.x0), prob.grad(prob.x0)
    s = 0.3 * float(torch.linalg.eigvalsh(H)[-1])  # far below λ_max: the series diverges
    opt = PaperNeumannIHVP(prob.params, lr=1.0, damping=0.0, num_terms=30, scale=s, scale_refresh=2)
    opt.step(prob.loss_closure())
    x1 = prob.flat()
    assert torch.isfinite(x1).all()
    # the fallback step g/s' along g, with s' = s·r for the largest Rayleigh quotient r seen:
    # s < s' ≤ λ_max (the quotient proves λ_max ≥ r·s), so it is no longer than 1/(0.3 λ_max)
    step = prob.x0 - x1
    s_used = float(g.dot(g) / g.dot(step))
    assert torch.allclose(step, g / s_used, rtol=1e-10)
    assert s < s_used <= s / 0.3 * (1 + 1e-9)
    assert (
        int(opt.global_state["neumann_fallbacks"]) == 1
        and int(opt.global_state["skipped_steps"]) == 0
    )
    assert torch.isnan(
        opt.global_state["scale"]
    )  # a given scale is the user's: never estimated or raised
    with pytest.warns(
        RuntimeWarning, match=r"1 of the last 1 step\(s\) — the Neumann series"
    ) as rec:
        opt.step(prob.loss_closure())  # call 1, the first sync point, reports call 0
    assert rec[0].filename == __file__  # the user's line, not the package's
    assert "counters()['neumann_fallbacks'] = 1" in str(rec[0].message)


def test_stale_estimated_scale_is_raised_on_device():
    """An estimated s below λ_max (the curvature grew since the estimate): the step falls back,
    and a Rayleigh quotient r > 1 raises s to 1.05·r·s, which is a lower bound on 1.05·λ_max,
    so after a few steps s exceeds λ_max again and the series converges — without a refresh."""
    prob = MLPProblem()
    opt = PaperNeumannIHVP(prob.params, lr=0.5, damping=1.0, num_terms=10, scale_refresh=1000)
    opt.step(prob.loss_closure())
    eye = torch.eye(37, dtype=F64)

    def top() -> float:
        return float(torch.linalg.eigvalsh(prob.hessian(prob.flat()) + eye)[-1])

    here = top()  # at the point of the next step
    stale = 0.3 * here  # Rayleigh quotients up to 3.3: beyond 2, where the series diverges
    opt.global_state["scale"] = torch.tensor(stale, dtype=F64)
    opt.step(prob.loss_closure())
    assert int(opt.global_state["neumann_fallbacks"]) == 1
    # r·s ≤ λ_max, and after 10 terms r·s is within 0.01 % of it here (measured): 1.05·r·s
    assert 1.04 * here < float(opt.global_state["scale"]) <= 1.05 * here * (1 + 1e-6)
    for _ in range(6):
        opt.step(prob.loss_closure())
    assert int(opt.global_state["neumann_fallbacks"]) <= 3
    assert float(opt.global_state["scale"]) >= top()


def test_invalid_options_are_refused():
    prob = MLPProblem()
    for kwargs, match in [
        (dict(num_terms=0), "num_terms"),
        (dict(scale=-1.0), "scale"),
        (dict(scale_refresh=0), "scale_refresh"),
        (dict(hvp="x"), "hvp"),
        (dict(damping=-1.0), "damping"),
    ]:
        with pytest.raises(ValueError, match=match):
            PaperNeumannIHVP(prob.params, **kwargs)


def test_param_groups_and_lr_scheduler():
    prob = MLPProblem()
    H = prob.hessian(prob.x0)
    lam = 0.5 - min(0.0, float(torch.linalg.eigvalsh(H)[0]))
    s = 1.2 * float(torch.linalg.eigvalsh(H)[-1] + lam)
    w1, b1, w2, b2 = prob.params
    opt = PaperNeumannIHVP(
        [{"params": [w1, b1], "lr": 0.25}, {"params": [w2, b2]}],
        lr=1.0,
        damping=lam,
        num_terms=5,
        scale=s,
    )
    full, _ = _dense(prob, 5, s, lam, 1.0)
    n1 = w1.numel() + b1.numel()
    lrs = torch.cat([torch.full((n1,), 0.25, dtype=F64), torch.ones(len(full) - n1, dtype=F64)])
    expected = prob.x0 + lrs * (full - prob.x0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: float(epoch == 0))  # then lr = 0
    opt.step(prob.loss_closure())
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < 1e-10
    sched.step()
    x1 = prob.flat().clone()
    opt.step(prob.loss_closure())
    assert torch.equal(prob.flat(), x1)
