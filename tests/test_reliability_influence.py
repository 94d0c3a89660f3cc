"""influence() on misuse: batch-averaged losses, models left in training mode, truncated solvers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _optim_problems import bce_per_sample, fit_to_optimum

from torch_rankone import linalg
from torch_rankone.influence import influence

F64 = torch.float64


def _ce(out, t):
    return F.cross_entropy(out, t, reduction="none")


_bce = bce_per_sample


def _softmax_regression(n=20, d=5, classes=3, wd=0.01):
    """Multinomial logistic regression with weight decay ``wd``, trained to optimality."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=gen, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=gen)
    model = torch.nn.Linear(d, classes).to(F64)
    fit_to_optimum(model, lambda: F.cross_entropy(model(X), y), wd)
    return model, (X, y), (X[:4], y[:4]), wd


def test_batch_averaged_loss_is_refused_with_reduction_hint():
    model, train, test, wd = _softmax_regression()
    before = [p.detach().clone() for p in model.parameters()]
    for method in ("exact", "cg"):
        with pytest.raises(ValueError, match=r"reduction='none'") as info:
            influence(model, F.cross_entropy, train, test, method=method, weight_decay=wd)
        assert "shape ()" in str(info.value) and "20 samples" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # a per-sample loss on the same problem works, and so does a batch of one row, where the
    # mean and the per-sample loss agree
    ref = influence(model, _ce, train, test, method="exact", weight_decay=wd)
    one = influence(model, F.cross_entropy, train, test, method="exact", weight_decay=wd,
                    batch_size=1)  # fmt: skip
    torch.testing.assert_close(one, ref)


@pytest.mark.parametrize("layer", ["batchnorm", "dropout"])
def test_model_in_train_mode_is_refused_with_eval_hint(layer):
    torch.manual_seed(0)
    mid = torch.nn.BatchNorm1d(8) if layer == "batchnorm" else torch.nn.Dropout(0.1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), mid, torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(F64).train()
    X, y = torch.randn(20, 5, dtype=F64), torch.randint(0, 3, (20,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.eval\(\)") as info:
        influence(model, _ce, (X, y), (X[:2], y[:2]), method="exact", damping=1.0)
    assert type(mid).__name__ in str(info.value)
    assert model.training  # untouched: mode, parameters and running statistics
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    scores = influence(model, _ce, (X, y), (X[:2], y[:2]), method="exact", damping=1.0)
    assert scores.shape == (2, 20) and torch.isfinite(scores).all()


def test_buffer_mutated_in_forward_gets_the_eval_hint():
    class Counting(torch.nn.Linear):
        def __init__(self):
            super().__init__(5, 3, dtype=F64)
            self.register_buffer("calls", torch.zeros((), dtype=F64))

        def forward(self, x):
            if self.training:
                self.calls.add_(1)  # a train-mode side effect, like running statistics
            return super().forward(x)

    model = Counting()
    X, y = torch.randn(20, 5, dtype=F64), torch.randint(0, 3, (20,))
    with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
        influence(model, _ce, (X, y), (X[:2], y[:2]), method="exact", damping=1.0)
    # a model in train mode without such layers is fine: its train mode changes nothing
    plain = torch.nn.Linear(5, 3).to(F64).train()
    assert influence(plain, _ce, (X, y), (X[:2], y[:2]), method="exact", damping=1.0).shape == (
        2,
        20,
    )


@pytest.fixture(scope="module")
def ill_conditioned_logreg():
    """Logistic regression with features on scales 1..0.1 and weight decay 0.002."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=gen, dtype=F64) * torch.logspace(0, -1, 6, dtype=F64)
    w_true = torch.randn(6, generator=gen, dtype=F64)
    y = (torch.rand(200, generator=gen, dtype=F64) < torch.sigmoid(X @ w_true)).to(F64)
    model = torch.nn.Linear(6, 1).to(F64)
    wd = 0.002
    fit_to_optimum(model, lambda: _bce(model(X), y).mean(), wd)
    return model, (X[:150], y[:150]), (X[150:155], y[150:155]), wd


def test_neumann_defaults_warn_when_the_series_is_truncated(ill_conditioned_logreg):
    model, train, test, wd = ill_conditioned_logreg
    exact = influence(model, _bce, train, test, method="exact", weight_decay=wd)
    with pytest.warns(RuntimeWarning, match="num_terms=100"):
        short = influence(model, _bce, train, test, method="neumann", weight_decay=wd)
    assert float((short - exact).norm() / exact.norm()) > 1e-2  # measured: 3.5 %
    # with damping the default 100 terms are plenty: no warning; rtol= moves the threshold
    damped = dict(weight_decay=wd, damping=0.05)
    exact_damped = influence(model, _bce, train, test, method="exact", **damped)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        damped_neumann = influence(model, _bce, train, test, method="neumann", **damped)
        influence(model, _bce, train, test, method="neumann", weight_decay=wd, rtol=0.5)
    assert float((damped_neumann - exact_damped).norm() / exact_damped.norm()) < 1e-6


def test_cg_stops_at_max_iters_with_a_warning_naming_the_knobs():
    model, train, test, _ = _softmax_regression(wd=0.0)  # damping 0, 18 parameters
    calls = []
    full = linalg.cg_ihvp

    def counting_cg(*args, **kwargs):
        calls.append(kwargs["max_iters"])
        return full(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "cg_ihvp", counting_cg)
        with pytest.warns(RuntimeWarning, match="max_iters.*damping"):
            influence(model, _ce, train, test, method="cg", max_iters=3)
    assert calls == [3] * 4  # one capped solve per test point
