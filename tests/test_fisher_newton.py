"""FisherNewton (SPEC §4.2): one step against the dense empirical-Fisher formula, theory damping,
the true-Fisher option, and the optimizer protocol."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _optim_problems import F64, MLPProblem

from torch_rankone import FisherNewton
from torch_rankone.optim import CurvatureError


def _dense_fisher_step(prob, lr, alpha, lams=None):
    J = prob.per_sample_jacobian(prob.x0)  # loop, independent of vmap
    g = J.mean(0)
    D = J.T @ J / J.shape[0]
    Lam = torch.diag(lams) if lams is not None else alpha * torch.eye(len(g), dtype=F64)
    return prob.x0 - lr * torch.linalg.solve(D + Lam, g), g


def test_one_step_equals_dense_formula():
    prob = MLPProblem()
    opt = FisherNewton(prob.params, lr=0.8, damping=0.05)
    expected, g = _dense_fisher_step(prob, 0.8, 0.05)
    loss = opt.step(prob.per_sample_losses)
    assert torch.allclose(loss, prob.f(prob.x0), rtol=1e-12)
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < 1e-8
    from torch_rankone._tensorlist import flatten

    assert torch.allclose(flatten([p.grad for p in prob.params]), g, rtol=1e-12)


def test_theory_damping_cross_entropy_and_mse():
    prob = MLPProblem()
    M = 3.0
    opt = FisherNewton(prob.params, damping_mode="theory", hessian_lipschitz=M)
    J = prob.per_sample_jacobian(prob.x0)
    f0 = float(prob.f(prob.x0))
    alpha = math.sqrt(M * float(J.mean(0).norm()) / 2) + 2 * f0  # σ = 2 f (mean form)
    expected, _ = _dense_fisher_step(prob, 1.0, alpha)
    opt.step(prob.per_sample_losses)
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < 1e-8
    assert abs(float(opt.state["damping"]) - alpha) < 1e-10 * alpha

    # least squares: ℓ_s = ½ (φ_s − b_s)², σ = L √2 (√(f − f*) + √f*)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).to(F64)
    X, b = torch.randn(10, 3, dtype=F64), torch.randn(10, dtype=F64)
    L, f_star = 2.0, 0.01
    params = list(model.parameters())
    x0 = torch.cat([p.detach().reshape(-1) for p in params])

    def per_sample(z):
        return 0.5 * (X @ z[:3] + z[3] - b) ** 2

    J = torch.stack([torch.func.grad(lambda z, s=s: per_sample(z)[s])(x0) for s in range(10)])
    f = float(per_sample(x0).mean())
    g = J.mean(0)
    alpha = math.sqrt(M * float(g.norm()) / 2) + L * math.sqrt(2) * (
        math.sqrt(f - f_star) + math.sqrt(f_star)
    )
    expected = x0 - torch.linalg.solve(J.T @ J / 10 + alpha * torch.eye(4, dtype=F64), g)
    opt = FisherNewton(
        params,
        damping_mode="theory",
        loss_type="mse",
        hessian_lipschitz=M,
        smoothness=L,
        f_star=f_star,
    )
    opt.step(lambda: 0.5 * (model(X).squeeze(1) - b) ** 2)
    got = torch.cat([p.detach().reshape(-1) for p in params])
    assert (got - expected).norm() / (expected - x0).norm() < 1e-8


def test_param_groups_with_their_own_lr_and_damping():
    prob = MLPProblem()
    w1, b1, w2, b2 = prob.params
    n1 = w1.numel() + b1.numel()
    n = prob.x0.numel()
    opt = FisherNewton(
        [{"params": [w1, b1], "lr": 0.5, "damping": 2.0}, {"params": [w2, b2]}], lr=1.0, damping=0.3
    )
    lams = torch.cat([torch.full((n1,), 2.0, dtype=F64), torch.full((n - n1,), 0.3, dtype=F64)])
    lrs = torch.cat([torch.full((n1,), 0.5, dtype=F64), torch.ones(n - n1, dtype=F64)])
    J = prob.per_sample_jacobian(prob.x0)
    y = torch.linalg.solve(J.T @ J / J.shape[0] + torch.diag(lams), J.mean(0))
    expected = prob.x0 - lrs * y
    opt.step(prob.per_sample_losses)
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < 1e-8


def test_true_fisher_samples_labels_reproducibly():
    def run(seed):
        prob = MLPProblem()
        opt = FisherNewton(
            prob.params, damping=0.1, fisher="true", generator=torch.Generator().manual_seed(seed)
        )
        loss = opt.step(lambda: (prob.model(prob.X), prob.Y))
        return prob, loss

    p1, loss1 = run(0)
    p2, _ = run(0)
    p3, _ = run(1)
    assert torch.equal(p1.flat(), p2.flat())
    assert not torch.equal(p1.flat(), p3.flat())  # different sampled labels
    assert torch.allclose(loss1, p1.f(p1.x0))  # the loss uses the data labels
    prob = MLPProblem()
    emp = FisherNewton(prob.params, damping=0.1)
    emp.step(prob.per_sample_losses)
    assert not torch.equal(prob.flat(), p1.flat())


def test_source_errors_and_validation():
    prob = MLPProblem()
    opt = FisherNewton(prob.params)
    with pytest.raises(CurvatureError, match="per-sample losses"):
        opt.step()
    with pytest.raises(CurvatureError, match="1-D tensor"):
        opt.step(prob.loss)
    with pytest.raises(CurvatureError, match="no graph"):
        opt.step(lambda: prob.per_sample_losses().detach())
    with pytest.raises(CurvatureError, match="outputs, targets"):
        FisherNewton(prob.params, fisher="true").step(prob.per_sample_losses)
    assert torch.equal(prob.flat(), prob.x0)
    for kwargs, match in [
        (dict(damping=0.0), "damping > 0"),
        (dict(loss_type="hinge"), "loss_type"),
        (dict(fisher="exact"), "fisher"),
        (dict(damping_mode="theory"), "hessian_lipschitz"),
        (dict(damping_mode="theory", hessian_lipschitz=1.0, loss_type="mse"), "smoothness"),
    ]:
        with pytest.raises(ValueError, match=match):
            FisherNewton(prob.params, **kwargs)


def test_nan_masking_and_resume():
    torch.manual_seed(0)
    prob = MLPProblem()
    opt = FisherNewton(prob.params, lr=0.5, damping=0.1)
    opt.step(prob.per_sample_losses)
    saved_model, saved_opt = copy.deepcopy(prob.model.state_dict()), copy.deepcopy(opt.state_dict())
    x1 = prob.flat().clone()

    def bad():
        losses = prob.per_sample_losses()
        return torch.cat([losses[:-1], losses[-1:] * float("nan")])

    opt.step(bad)
    assert torch.equal(prob.flat(), x1)
    assert int(opt.state["skipped_steps"]) == 1 and int(opt.state["step"]) == 1
    for _ in range(3):
        opt.step(prob.per_sample_losses)
    final = prob.flat().clone()

    prob2 = MLPProblem()
    opt2 = FisherNewton(prob2.params, lr=0.5, damping=0.1)
    prob2.model.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    opt2.step(bad)
    for _ in range(3):
        opt2.step(prob2.per_sample_losses)
    assert torch.equal(prob2.flat(), final)


class _MixedNet(torch.nn.Module):
    """Linear layers (implicit rows), a LayerNorm (materialised rows) and a Linear used twice
    (shared weights need cross terms: materialised rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.shared = torch.nn.Linear(6, 6, bias=False)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_linear_fast_path_equals_materialised_rows_and_dense_formula(fisher):
    from torch_rankone._tensorlist import flatten

    def run(use_module):
        torch.manual_seed(0)
        net = _MixedNet().to(F64)
        gen = torch.Generator().manual_seed(1)
        X, Y = (
            torch.randn(12, 4, generator=gen, dtype=F64),
            torch.randint(0, 3, (12,), generator=gen),
        )
        groups = [
            {"params": list(net.inp.parameters()), "damping": 0.7, "lr": 0.5},
            {"params": [p for n, p in net.named_parameters() if not n.startswith("inp")]},
        ]
        opt = FisherNewton(
            groups,
            damping=0.2,
            fisher=fisher,
            module=net if use_module else None,
            generator=torch.Generator().manual_seed(3),
        )
        x0 = flatten([p.detach() for p in net.parameters()]).clone()
        if fisher == "true":
            opt.step(lambda: (net(X), Y))
        else:
            opt.step(lambda: torch.nn.functional.cross_entropy(net(X), Y, reduction="none"))
        return net, X, Y, x0, flatten([p.detach() for p in net.parameters()])

    net, X, Y, x0, fast = run(True)
    _, _, _, _, slow = run(False)
    assert (fast - slow).norm() / (slow - x0).norm() < 1e-10
    if fisher == "true":
        return
    # dense: per-sample Jacobian by a loop over samples
    from torch.func import functional_call

    from torch_rankone._tensorlist import unflatten

    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())

    def loss_s(z, s):
        out = functional_call(net, dict(zip(names, unflatten(z, params))), (X[s : s + 1],))
        return torch.nn.functional.cross_entropy(out, Y[s : s + 1])

    J = torch.stack([torch.func.grad(loss_s)(x0, s) for s in range(12)])
    n_inp = sum(p.numel() for p in net.inp.parameters())
    lam = torch.cat(
        [torch.full((n_inp,), 0.7, dtype=F64), torch.full((len(x0) - n_inp,), 0.2, dtype=F64)]
    )
    lrs = torch.cat([torch.full((n_inp,), 0.5, dtype=F64), torch.ones(len(x0) - n_inp, dtype=F64)])
    expected = x0 - lrs * torch.linalg.solve(J.T @ J / 12 + torch.diag(lam), J.mean(0))
    assert (fast - expected).norm() / (expected - x0).norm() < 1e-8
