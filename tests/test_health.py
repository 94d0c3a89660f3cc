"""Nothing is silent: skipped steps, fallbacks and safeguard hits are reported by a
RuntimeWarning at documented sync points, attributed to the caller's line; the update extras
(momentum, decoupled weight decay) follow their formulas."""

from __future__ import annotations

import warnings

import pytest
import torch
from _optim_problems import MLPProblem, PaperRankOneNewton

from torch_rankone import RankOneNewton


def test_sync_points_are_powers_of_two_then_every_interval():
    opt = RankOneNewton(MLPProblem().params)
    points = [c for c in range(1, 401) if opt._is_sync_point(c)]
    assert points == [1, 2, 4, 8, 16, 32, 64, 100, 200, 300, 400]


def test_safeguard_firing_on_most_steps_is_reported_at_the_callers_line():
    prob = MLPProblem()
    opt = PaperRankOneNewton(prob.params, lr=0.0, damping=1e-6)  # swamped: fires every step
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # wraps opt.step
    with pytest.warns(RuntimeWarning, match=r"safeguard_hits") as rec:
        for _ in range(3):
            opt.step(prob.loss_closure())
            sched.step()
    messages = [w for w in rec if "safeguard" in str(w.message)]
    assert int(opt.global_state["safeguard_hits"]) == 3
    assert len(messages) == 2  # calls 1 and 2 are sync points; call 0 had nothing before it
    assert all(w.filename == __file__ for w in messages)
    assert "1 of the last 1 step(s)" in str(messages[0].message)
    assert "raise damping" in str(messages[0].message)


def test_quiet_when_nothing_goes_wrong():
    prob = MLPProblem()
    opt = RankOneNewton(prob.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(9):
            opt.step(prob.loss_closure())


def test_weight_decay_is_decoupled_and_momentum_averages_the_gradient():
    """x₁ = x₀(1 − lr·wd) − lr·y(m̂₁) with m̂₁ = g₀ (bias-corrected), then m̂₂ =
    (β(1−β) g₀ + (1−β) g₁)/(1 − β²): checked against two hand-made steps of the same direction
    (the isotropic step is linear in the vector it is applied to, with the same probe)."""
    lr, wd, beta = 0.2, 0.1, 0.5
    plain, extra = MLPProblem(), MLPProblem()
    a = PaperRankOneNewton(
        plain.params, lr=lr, damping=2.0, generator=torch.Generator().manual_seed(0)
    )
    b = PaperRankOneNewton(
        extra.params,
        lr=lr,
        damping=2.0,
        weight_decay=wd,
        momentum=beta,
        generator=torch.Generator().manual_seed(0),
    )
    x0 = plain.flat().clone()
    a.step(plain.loss_closure())
    b.step(extra.loss_closure())
    y0 = (x0 - plain.flat()) / lr  # the direction at x₀ for g₀ (no momentum, no decay)
    assert torch.allclose(extra.flat(), x0 * (1 - lr * wd) - lr * y0, rtol=1e-12, atol=1e-14)
    for p, q in zip(plain.params, extra.params):  # m₁ = (1 − β) g₀; .grad holds g₀
        assert torch.allclose(b.state[q]["momentum_buffer"], (1 - beta) * p.grad, rtol=1e-12)
    with pytest.raises(ValueError, match="momentum must be < 1"):
        RankOneNewton(plain.params, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        RankOneNewton(plain.params, weight_decay=-1.0)
