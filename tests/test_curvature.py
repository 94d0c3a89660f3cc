"""curvature: both HVP paths, per-sample gradients and the top eigenvalue vs dense references."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp, rel_err
from torch.autograd.functional import hessian
from torch.func import functional_call

from torch_rankone._tensorlist import flatten, unflatten
from torch_rankone.curvature import (
    functional_per_sample_grads,
    graph_hvp,
    graph_hvp_fn,
    hvp,
    lambda_max,
    per_sample_grads,
    power_iteration,
)


def _mlp_problem(seed=0):
    model = make_mlp((5, 7, 3), seed=seed)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen)

    def f(ps):
        out = functional_call(model, dict(zip(names, ps)), (X,))
        return torch.nn.functional.cross_entropy(out, y)

    return model, f, params, X, y


def _dense_hessian(f, params):
    """Dense Hessian of ``f`` (a function of a tuple of tensors) w.r.t. their concatenation."""
    flat = flatten(params).clone()
    return hessian(lambda z: f(tuple(unflatten(z, params))), flat)


def test_hvp_both_paths_match_dense_hessian_on_mlp():
    _, f, params, _, _ = _mlp_problem()
    H = _dense_hessian(f, params)
    assert H.shape == (sum(p.numel() for p in params),) * 2
    gen = torch.Generator().manual_seed(1)
    v = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)
    expected = H @ flatten(v)

    forward_over_reverse = hvp(f, params, v)
    assert rel_err(flatten(forward_over_reverse), expected) < 1e-9

    leaves = [p.clone().requires_grad_() for p in params]
    grads = torch.autograd.grad(f(tuple(leaves)), leaves, create_graph=True)
    reverse_over_reverse = graph_hvp(grads, leaves, list(v))
    assert rel_err(flatten(reverse_over_reverse), expected) < 1e-9


def test_hvp_both_paths_match_dense_hessian_on_mushrooms_logreg(mushrooms_logreg):
    prob = mushrooms_logreg
    d = prob.A.shape[1]
    assert d == 112 and prob.A.shape[0] == 8124
    gen = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    H_autograd = hessian(prob.loss, x)
    H_closed = prob.hessian(x)
    assert rel_err(H_autograd, H_closed) < 1e-12  # the two dense references agree
    expected = H_autograd @ v

    assert rel_err(hvp(prob.loss, x, v), expected) < 1e-9
    xl = x.clone().requires_grad_()
    grads, hvp_fn = graph_hvp_fn(prob.loss(xl), [xl])
    assert rel_err(hvp_fn([v])[0], expected) < 1e-9
    # the returned gradient is the plain gradient
    assert rel_err(grads[0].detach(), torch.func.grad(prob.loss)(x)) < 1e-12


def test_graph_hvp_unused_and_constant_gradients_give_zero():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)  # loss linear in b
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = (w**3).sum() + b.sum()
    grads, hvp_fn = graph_hvp_fn(loss, [w, b, unused])
    v = [torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(4)]
    hw, hb, hu = hvp_fn(v)
    torch.testing.assert_close(hw, 6 * w.detach())
    assert hb.abs().max() == 0 and hu.abs().max() == 0 and hu.shape == (4,)


def test_hvp_rejects_mismatched_direction():
    _, f, params, _, _ = _mlp_problem()
    with pytest.raises(ValueError, match="shape"):
        hvp(f, params, tuple(torch.zeros(3) for _ in params))
    with pytest.raises(ValueError, match="gradients"):
        graph_hvp([torch.zeros(1)], [torch.zeros(1), torch.zeros(2)], [torch.zeros(1)])


def test_per_sample_grads_equal_per_sample_loop():
    model, _, _, X, y = _mlp_problem(seed=3)
    params = list(model.parameters())
    losses = torch.nn.functional.cross_entropy(model(X), y, reduction="none")
    batched = per_sample_grads(losses, params)
    for s in range(X.shape[0]):
        loss_s = torch.nn.functional.cross_entropy(model(X[s : s + 1]), y[s : s + 1])
        loop = torch.autograd.grad(loss_s, params)
        for bp, lp in zip(batched, loop):
            assert bp.shape[0] == X.shape[0]
            assert rel_err(bp[s], lp) < 1e-12

    names = [n for n, _ in model.named_parameters()]
    detached = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(ps, x, t):
        out = functional_call(model, ps, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, t.unsqueeze(0))

    func = functional_per_sample_grads(loss_one, detached, X, y)
    for n, bp in zip(names, batched):
        assert rel_err(func[n], bp) < 1e-12


def test_per_sample_grads_errors():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="1-D"):
        per_sample_grads((w**2).sum(), [w])
    with pytest.raises(ValueError, match="require grad"):
        per_sample_grads(torch.ones(3), [w])
    with pytest.raises(ValueError, match="leading batch"):
        functional_per_sample_grads(lambda p, a, b: p.sum(), w, torch.ones(3), torch.ones(4))


def test_lambda_max_matches_eigvalsh_on_real_data(mushrooms_logreg):
    prob = mushrooms_logreg
    x = torch.zeros(prob.A.shape[1], dtype=torch.float64)
    H = prob.hessian(x)
    exact = torch.linalg.eigvalsh(H)[-1]
    gen = torch.Generator().manual_seed(0)
    est = lambda_max(lambda v: [H @ v[0]], [x], max_iters=2000, tol=1e-9, generator=gen)
    assert abs(float(est - exact)) < 1e-6 * max(1.0, float(exact))


def test_power_iteration_finds_negative_dominant_eigenvalue_and_warns_when_stalled():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    H = Q @ torch.diag(torch.tensor([-5.0, 1, 0.5, 0.2, 0.1, 3.0], dtype=torch.float64)) @ Q.T
    like = [torch.zeros(6, dtype=torch.float64)]
    res = power_iteration(lambda v: [H @ v[0]], like, max_iters=500, tol=1e-10, generator=gen)
    assert res.converged and abs(float(res.eigenvalue) + 5.0) < 1e-9
    # ±5 of equal magnitude: power iteration cannot converge, and says so
    H2 = Q @ torch.diag(torch.tensor([-5.0, 5.0, 1, 1, 1, 1], dtype=torch.float64)) @ Q.T
    with pytest.warns(RuntimeWarning, match="not converged"):
        res2 = power_iteration(lambda v: [H2 @ v[0]], like, max_iters=50, generator=gen)
    assert not res2.converged
    with pytest.raises(FloatingPointError):
        power_iteration(lambda v: [v[0] * float("nan")], like, generator=gen)


def test_power_iteration_contract_defaults_start_and_validation():
    """The documented contract, against dense eigendecompositions: ``tol`` (default 1e-6) is the
    relative residual at which it stops, ``max_iters`` (default 100) the HVP budget, ``init`` the
    start (an exact eigenvector stops after one HVP), ``generator`` the random start, and
    ``raise_nonfinite=False`` returns a NaN eigenvalue instead of raising."""
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    eig = torch.tensor([4.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    H = Q @ torch.diag(eig) @ Q.T
    like = [torch.zeros(6, dtype=torch.float64)]

    def hvp(v):
        return [H @ v[0]]

    res = power_iteration(hvp, like, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.residual <= 1e-6 < 1.0
    assert abs(float(res.eigenvalue) - 4.0) < 1e-9  # error ~ tol² λ / gap
    assert 1 < res.num_iters < 100
    exact = power_iteration(hvp, like, init=[Q[:, 0].clone()])
    assert exact.num_iters == 1 and exact.converged
    assert torch.allclose(exact.eigenvector[0].abs(), Q[:, 0].abs(), atol=1e-12)
    # the default budget: ±4 of equal magnitude never converges
    H2 = Q @ torch.diag(torch.tensor([4.0, -4.0, 1, 1, 1, 1], dtype=torch.float64)) @ Q.T
    with pytest.warns(RuntimeWarning, match="not converged after 100 iterations"):
        stalled = power_iteration(lambda v: [H2 @ v[0]], like, generator=gen)
    assert stalled.num_iters == 100 and not stalled.converged
    # the start comes from the generator given: equal seeds, equal results; others differ
    runs = [
        power_iteration(
            hvp, like, max_iters=1, generator=torch.Generator().manual_seed(s), warn=False
        )
        for s in (3, 3, 4)
    ]
    assert torch.equal(runs[0].eigenvector[0], runs[1].eigenvector[0])
    assert not torch.equal(runs[0].eigenvector[0], runs[2].eigenvector[0])
    assert runs[0].num_iters == 1
    for kwargs, match in [({"max_iters": 0}, "max_iters must be >= 1"), ({"tol": 0.0}, "tol")]:
        with pytest.raises(ValueError, match=match):
            power_iteration(hvp, like, **kwargs)
    nan = power_iteration(
        lambda v: [v[0] * float("nan")], like, raise_nonfinite=False, generator=gen
    )
    assert torch.isnan(nan.eigenvalue) and not nan.converged
