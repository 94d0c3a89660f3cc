"""Finite-difference HVPs re-run the closure as if it ran once per step: same dropout masks,
BatchNorm statistics advanced once, the global random stream advanced once; half precision is
refused before anything changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_rankone.optim import CurvatureError
from torch_rankone.optim._protocol import evaluate

F64 = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.25), nn.Linear(8, 3)
    ).to(F64)


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=gen, dtype=F64), torch.randint(0, 3, (16,), generator=gen)


def _backward_closure(model, params, X, Y):
    def closure():
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    return closure


def test_fd_hvp_with_dropout_and_batchnorm_equals_exact_hvp_with_the_same_masks():
    model, (X, Y) = _model(), _data()
    params = list(model.parameters())
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
         for i, p in enumerate(params)]  # fmt: skip
    stats = [b.clone() for b in model.buffers()]

    torch.manual_seed(42)  # the masks of the exact reference
    loss = nn.functional.cross_entropy(model(X), Y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    exact = torch.autograd.grad(grads, params, grad_outputs=v)
    after_one_forward = [b.clone() for b in model.buffers()]
    rng_after_one = torch.get_rng_state()

    with torch.no_grad():  # back to the statistics before that forward
        for b, s in zip(model.buffers(), stats):
            b.copy_(s)
    torch.manual_seed(42)
    ev = evaluate(params, _backward_closure(model, params, X, Y), "fd", module=model)
    fd = ev.hvp_fn(v)
    ev.hvp_fn(v)  # more products (e.g. power iterations) change nothing either
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(fd, exact)))
    den = torch.sqrt(sum((b**2).sum() for b in exact))
    assert float(num / den) < 1e-7
    for b, ref in zip(model.buffers(), after_one_forward):
        assert torch.equal(b, ref)  # running statistics advanced exactly once
    assert torch.equal(torch.get_rng_state(), rng_after_one)  # global stream advanced once


def test_without_module_buffers_advance_on_every_closure_call():
    model, (X, Y) = _model(), _data()
    params = list(model.parameters())
    ev = evaluate(params, _backward_closure(model, params, X, Y), "fd")
    before = model[1].num_batches_tracked.clone()
    ev.hvp_fn([torch.ones_like(p) for p in params])
    assert int(model[1].num_batches_tracked) == int(before) + 2  # documented: two more calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite_differences_are_refused_before_anything_changes(dtype):
    model = nn.Linear(4, 2).to(dtype)
    params = list(model.parameters())
    x = torch.randn(8, 4).to(dtype)
    saved = [p.detach().clone() for p in params]
    calls = []

    def closure():
        calls.append(1)
        return model(x).float().pow(2).mean()

    with pytest.raises(CurvatureError, match="float32 or float64"):
        evaluate(params, closure, "fd")
    assert not calls and all(torch.equal(p, s) for p, s in zip(params, saved))


def test_random_numbers_drawn_between_products_are_not_replayed():
    model, (X, Y) = _model(), _data()
    params = list(model.parameters())
    v = [torch.ones_like(p) for p in params]
    torch.manual_seed(3)
    ev = evaluate(params, _backward_closure(model, params, X, Y), "fd", module=model)
    a = torch.rand(4)
    ev.hvp_fn(v)
    b = torch.rand(4)
    ev.hvp_fn(v)

    torch.manual_seed(3)
    _backward_closure(model, params, X, Y)()  # one closure call: the same draws
    assert torch.equal(torch.rand(8), torch.cat([a, b]))


def test_loss_closure_with_fd_sees_the_same_masks():
    model, (X, Y) = _model(), _data()
    params = list(model.parameters())
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + i), dtype=F64)
         for i, p in enumerate(params)]  # fmt: skip
    stats = [b.clone() for b in model.buffers()]

    torch.manual_seed(5)
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(X), Y), params, create_graph=True)
    exact = torch.autograd.grad(grads, params, grad_outputs=v)
    with torch.no_grad():
        for b, s in zip(model.buffers(), stats):
            b.copy_(s)

    torch.manual_seed(5)
    ev = evaluate(params, lambda: nn.functional.cross_entropy(model(X), Y), "fd", module=model)
    assert ev.source == "loss_closure"
    fd = ev.hvp_fn(v)
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(fd, exact)))
    assert float(num / torch.sqrt(sum((b**2).sum() for b in exact))) < 1e-7


def test_fd_step_is_relative_to_the_parameters_and_central():
    """``ε = eps^{1/3} · max(1, ‖x‖) / ‖v‖``, and the difference quotient is central: on
    ``f(x) = Σ x_i³`` (``Hv = 6 x ⊙ v``, a non-zero third derivative) its error is ``O(ε²)``."""
    from torch_rankone.optim._protocol import _fd_hvp_fn, fd_epsilon

    x = torch.full((4,), 50.0, dtype=torch.float64)  # ‖x‖ = 100
    v = torch.full((4,), 1.0, dtype=torch.float64)  # ‖v‖ = 2
    eps = float(fd_epsilon([x], [v]))
    assert abs(eps - torch.finfo(torch.float64).eps ** (1 / 3) * 100 / 2) < 1e-18
    p = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, -0.25, 2.0], dtype=torch.float64)
    hv = _fd_hvp_fn([p], lambda: [3 * p**2])([w])[0]
    exact = 6 * p * w
    # central: ~1e-11 relative here; a forward difference would be ~1e-5
    assert float((hv - exact).norm() / exact.norm()) < 1e-9
