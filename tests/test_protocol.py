"""The common optimizer protocol (SPEC §4) where it is the same for every optimizer."""

from __future__ import annotations

import pytest
import torch

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton


@pytest.mark.parametrize("cls", [RankOneNewton, FisherNewton, NeumannIHVP])
def test_grad_scaler_is_refused_clearly_and_changes_nothing(cls):
    """float16 mixed precision's GradScaler would scale the curvature but unscale only .grad:
    the step is refused before anything is touched (parameters and optimizer state)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = cls(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be stepped by a GradScaler.*bfloat16"):
        scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.global_state["step_calls"] == 0 and int(opt.global_state["step"]) == 0
    # without a scaler the same optimizer steps normally
    del opt.grad_scale, opt.found_inf  # left behind by the refused scaler.step
    opt.zero_grad()
    if cls is FisherNewton:
        opt.step(lambda: ((model(x) - y) ** 2).mean(dim=1))
    else:
        torch.nn.functional.mse_loss(model(x), y).backward(create_graph=True)
        opt.step()
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [RankOneNewton, FisherNewton, NeumannIHVP])
def test_every_optimizer_counts_step_calls_on_the_host(cls):
    """``global_state["step_calls"]`` (a host int, saved in state_dict) counts step() calls, skipped
    ones included — integrations and schedules read it without a device sync."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = cls(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(3):
        opt.step(
            lambda: (
                ((model(x) - y) ** 2).mean(dim=1)
                if cls is FisherNewton
                else torch.nn.functional.mse_loss(model(x), y)
            )
        )
    assert opt.global_state["step_calls"] == 3
    assert opt.state_dict()["state"][0]["step_calls"] == 3  # the first parameter's entry


def test_owned_generator_is_reproducible_but_not_the_global_stream():
    """Derived from ``torch.initial_seed()`` (reproducible) without replaying the global stream:
    the first direction is not the first tensor the user draws after ``torch.manual_seed``."""
    from torch_rankone._random import owned_generator

    torch.manual_seed(3)
    first = torch.randn(50, generator=owned_generator())
    users = torch.randn(50)
    torch.manual_seed(3)
    assert torch.equal(torch.randn(50, generator=owned_generator()), first)
    cosine = torch.nn.functional.cosine_similarity(first, users, dim=0)
    assert abs(float(cosine)) < 0.5
