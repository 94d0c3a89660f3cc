"""influence: the exact method equals the dense formula; CG / Neumann / LiSSA agree with it."""

from __future__ import annotations

import pytest
import torch
from _optim_problems import bce_per_sample, fit_to_optimum

from torch_rankone.influence import influence

F64 = torch.float64


_bce = bce_per_sample


@pytest.fixture(scope="module")
def convex_problem():
    """L2-regularised logistic regression (weight decay 0.05), trained to optimality."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=gen, dtype=F64)
    w_true = torch.randn(6, generator=gen, dtype=F64)
    y = (torch.rand(200, generator=gen, dtype=F64) < torch.sigmoid(X @ w_true)).to(F64)
    model = torch.nn.Linear(6, 1).to(F64)
    wd = 0.05
    fit_to_optimum(model, lambda: _bce(model(X), y).mean(), wd)
    return model, (X[:150], y[:150]), (X[150:155], y[150:155]), wd


def _dense_reference(model, train, test, wd, damping):
    """−g_testᵀ (H + λI)⁻¹ g_i with H from autograd.functional.hessian and per-sample loops."""
    w0 = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def loss_at(w, X, y):
        return _bce((X @ w[:-1] + w[-1]).unsqueeze(-1), y)

    objective = lambda w: loss_at(w, *train).mean() + wd / 2 * w @ w  # noqa: E731
    H = torch.autograd.functional.hessian(objective, w0)

    def grad(X, y):
        rows = [lambda w, i=i: loss_at(w, X[i : i + 1], y[i : i + 1]).sum() for i in range(len(y))]
        return torch.stack([torch.func.grad(f)(w0) for f in rows])

    G_train, G_test = grad(*train), grad(*test)
    return -G_test @ torch.linalg.solve(H + damping * torch.eye(len(w0), dtype=F64), G_train.T)


def test_exact_equals_dense_formula_and_iterative_methods_agree(convex_problem):
    model, train, test, wd = convex_problem
    ref = _dense_reference(model, train, test, wd, damping=0.01)
    common = dict(damping=0.01, weight_decay=wd, batch_size=64)
    exact = influence(model, _bce, train, test, method="exact", **common)
    assert exact.shape == (5, 150)
    assert (exact - ref).norm() / ref.norm() < 1e-10
    cg = influence(model, _bce, train, test, method="cg", **common)
    assert (cg - exact).norm() / exact.norm() < 1e-6
    neumann = influence(model, _bce, train, test, method="neumann", num_terms=400, **common)
    assert (neumann - exact).norm() / exact.norm() < 1e-6
    lissa = influence(
        model,
        _bce,
        train,
        test,
        method="lissa",
        depth=200,
        repeats=32,
        scale=4.0,  # a larger scale lowers LiSSA's variance (~ σ_H² / (s λ_min)) per depth
        generator=torch.Generator().manual_seed(0),
        damping=0.01,
        weight_decay=wd,
        batch_size=150,  # 150 rows drawn with replacement: a bootstrap of the 150 points
    )
    assert (lissa - exact).norm() / exact.norm() < 1e-2


def test_errors(convex_problem):
    model, train, test, wd = convex_problem
    with pytest.raises(ValueError, match="method"):
        influence(model, _bce, train, test, method="magic")
    with pytest.raises(ValueError, match="scale"):
        influence(model, _bce, train, test, method="lissa")
    with pytest.raises(ValueError, match="unknown"):
        influence(model, _bce, train, test, params=["nope"])
    with pytest.raises(ValueError, match="sample count"):
        influence(model, _bce, train, (test[0], test[1][:2]))
