"""FisherNewton: one step against the dense empirical-Fisher formula (relative, fixed and theory
damping), the true-Fisher option, implicit Linear and Conv2d rows, clipping, momentum and decay."""

from __future__ import annotations

import math

import pytest
import torch
from _optim_problems import F64, MLPProblem, PaperFisherNewton

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
    opt = PaperFisherNewton(prob.params, lr=0.8, damping=0.05)
    expected, g = _dense_fisher_step(prob, 0.8, 0.05)
    loss = opt.step(prob.per_sample_losses)
    assert torch.allclose(loss, prob.f(prob.x0), rtol=1e-12)
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < 1e-8
    from torch_rankone._tensorlist import flatten

    assert torch.allclose(flatten([p.grad for p in prob.params]), g, rtol=1e-12)


def test_theory_damping_cross_entropy_and_mse():
    prob = MLPProblem()
    M = 3.0
    opt = PaperFisherNewton(prob.params, damping_mode="theory", hessian_lipschitz=M)
    J = prob.per_sample_jacobian(prob.x0)
    f0 = float(prob.f(prob.x0))
    alpha = math.sqrt(M * float(J.mean(0).norm()) / 2) + 2 * f0  # σ = 2 f (mean form)
    expected, _ = _dense_fisher_step(prob, 1.0, alpha)
    opt.step(prob.per_sample_losses)
    assert (prob.flat() - expected).norm() / (expected - prob.x0).norm() < 1e-8
    assert abs(float(opt.global_state["damping"]) - alpha) < 1e-10 * alpha

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
    opt = PaperFisherNewton(
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
    opt = PaperFisherNewton(
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
        opt = PaperFisherNewton(
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
    emp = PaperFisherNewton(prob.params, damping=0.1)
    emp.step(prob.per_sample_losses)
    assert not torch.equal(prob.flat(), p1.flat())


def test_source_errors_and_validation():
    prob = MLPProblem()
    opt = PaperFisherNewton(prob.params)
    with pytest.raises(CurvatureError, match="per-sample losses"):
        opt.step()
    with pytest.raises(CurvatureError, match="1-D tensor"):
        opt.step(prob.loss)
    with pytest.raises(CurvatureError, match="no graph"):
        opt.step(lambda: prob.per_sample_losses().detach())
    with pytest.raises(CurvatureError, match="outputs, targets"):
        PaperFisherNewton(prob.params, fisher="true").step(prob.per_sample_losses)
    assert torch.equal(prob.flat(), prob.x0)
    for kwargs, match in [
        (dict(damping=0.0), "damping > 0"),
        (dict(loss_type="hinge"), "loss_type"),
        (dict(fisher="exact"), "fisher"),
        (dict(damping_mode="theory"), "hessian_lipschitz"),
        (dict(damping_mode="theory", hessian_lipschitz=1.0, loss_type="mse"), "smoothness"),
    ]:
        with pytest.raises(ValueError, match=match):
            PaperFisherNewton(prob.params, **kwargs)


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
        opt = PaperFisherNewton(
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


def _dense_relative_step(J, v, lr, damping):
    """``x − lr·c·(D + cI)⁻¹ v`` with ``c = damping·tr(D)/B`` (the relative mode), as ``Δx``."""
    B = J.shape[0]
    D = J.T @ J / B
    c = damping * torch.trace(D) / B
    return -lr * c * torch.linalg.solve(D + c * torch.eye(len(v), dtype=F64), v), c


def test_relative_damping_step_equals_dense_formula():
    """Default mode: c = damping·tr(D)/B (the mean of D's nonzero eigenvalues), step
    lr·c·(D + cI)⁻¹g; per-group damping values are relative to the same tr(D)/B."""
    prob = MLPProblem()
    J = prob.per_sample_jacobian(prob.x0)
    opt = FisherNewton(prob.params, lr=0.3, damping=0.5)
    opt.step(prob.per_sample_losses)
    dx, c = _dense_relative_step(J, J.mean(0), 0.3, 0.5)
    assert (prob.flat() - prob.x0 - dx).norm() / dx.norm() < 1e-10
    assert torch.allclose(opt.global_state["damping"], c, rtol=1e-12)
    eig = torch.linalg.eigvalsh(J.T @ J / J.shape[0])
    assert torch.allclose(c / 0.5, eig[eig > 1e-10].mean(), rtol=1e-8)  # B = 16 < N = 37

    prob = MLPProblem()
    w1, b1, w2, b2 = prob.params
    n1 = w1.numel() + b1.numel()
    opt = FisherNewton(
        [{"params": [w1, b1], "damping": 4.0, "lr": 0.2}, {"params": [w2, b2]}], lr=0.1, damping=1.0
    )
    opt.step(prob.per_sample_losses)
    scale = torch.trace(J.T @ J) / J.shape[0] ** 2
    lam = torch.cat([torch.full((n1,), 4.0, dtype=F64), torch.full((37 - n1,), 1.0, dtype=F64)])
    lrs = torch.cat([torch.full((n1,), 0.2, dtype=F64), torch.full((37 - n1,), 0.1, dtype=F64)])
    Lam = torch.diag(lam * scale)
    expected = -lrs * (Lam @ torch.linalg.solve(J.T @ J / J.shape[0] + Lam, J.mean(0)))
    assert (prob.flat() - prob.x0 - expected).norm() / expected.norm() < 1e-10


def test_relative_damping_limits_sgd_and_zero_batch():
    """Large damping gives the SGD step lr·g (lr is the SGD learning rate); an all-zero batch
    (every per-sample gradient 0) gives a zero step, not NaN, and is not counted as skipped."""
    prob = MLPProblem()
    g = prob.per_sample_jacobian(prob.x0).mean(0)
    FisherNewton(prob.params, lr=0.7, damping=1e7).step(prob.per_sample_losses)
    assert (prob.flat() - (prob.x0 - 0.7 * g)).norm() < 1e-5 * (0.7 * g).norm()  # O(B/damping)

    prob = MLPProblem()
    opt = FisherNewton(prob.params, module=prob.model)
    for _ in range(2):
        opt.step(lambda: 0.0 * prob.per_sample_losses())
    assert torch.equal(prob.flat(), prob.x0)
    assert int(opt.global_state["step"]) == 2 and int(opt.global_state["skipped_steps"]) == 0
    assert all(torch.isfinite(p.grad).all() for p in prob.params)


CONV_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False),
    dict(
        in_channels=3,
        out_channels=4,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
    ),  # fmt: skip
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding="same"),
    dict(in_channels=4, out_channels=4, kernel_size=(2, 4), groups=4, padding="same", dilation=2),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid", stride=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(
        in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="circular", stride=2
    ),  # fmt: skip
    dict(in_channels=2, out_channels=3, kernel_size=2, padding=1, padding_mode="replicate"),
]


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_conv2d_rows_equal_per_sample_gradients(case):
    """Conv2dRows (patches × output gradients) = each sample's own gradient (one backward per
    sample, float64); its Gram, J·v and Jᵀa equal those of the materialised rows."""
    from torch_rankone.optim.fisher_newton import Conv2dRows, PerSampleRows

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(**case).to(F64)
    B = 5
    A = torch.randn(B, case["in_channels"], 9, 8, dtype=F64)
    T = torch.randn(layer(A).shape, dtype=F64)  # ℓ_s = <T_s, conv(A_s)>: output gradient T
    rows = Conv2dRows.from_layer(layer, A, T)
    params = list(layer.parameters())
    dense = [torch.autograd.grad((layer(A[s : s + 1]) * T[s : s + 1]).sum(), params)
             for s in range(B)]  # fmt: skip
    ref = PerSampleRows(params, [torch.stack(gs) for gs in zip(*dense)])
    for got, want in zip(rows.param_shaped(), ref.rows):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(rows.gram(), ref.gram()):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    v = [torch.randn_like(p) for p in params]
    a = torch.randn(B, dtype=F64)
    for got, want in zip(rows.jvp(v), ref.jvp(v)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(rows.vjp(a), ref.vjp(a)):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


class _ScaledConv(torch.nn.Conv2d):
    """A subclass with its own forward: its rows must not come from the Conv2d formula."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class _SmallCNN(torch.nn.Module):
    def __init__(self, groups: int = 1, custom: bool = False) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        conv = _ScaledConv if custom else torch.nn.Conv2d
        self.c2 = conv(4, 6, 3, stride=2, groups=groups, bias=False)
        self.fc = torch.nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _small_cnn_step(use_module: bool, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    net = _SmallCNN(**kwargs).to(F64)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(10, 1, 8, 8, generator=gen, dtype=F64)
    Y = torch.randint(0, 3, (10,), generator=gen)
    x0 = [p.detach().clone() for p in net.parameters()]
    opt = FisherNewton(net.parameters(), lr=0.5, damping=0.3, module=net if use_module else None)
    opt.step(lambda: torch.nn.functional.cross_entropy(net(X), Y, reduction="none"))
    return torch.cat([(p - q).reshape(-1) for p, q in zip(net.parameters(), x0)])


@pytest.mark.parametrize("kwargs", [{}, {"groups": 2}, {"custom": True}], ids=str)
def test_conv_fast_path_equals_materialised_rows(kwargs):
    """module= (Conv2d and Linear rows from layer inputs and output gradients) gives the step of
    the materialised per-sample gradients (one vmapped backward); a Conv2d subclass with its
    own forward falls back to materialised rows."""
    fast, slow = _small_cnn_step(True, **kwargs), _small_cnn_step(False, **kwargs)
    assert (fast - slow).norm() < 1e-10 * slow.norm()


def test_max_grad_norm_clips_like_clip_grad_norm():
    """The step uses g·min(1, max/(‖g‖ + 1e-6)), as clip_grad_norm_ leaves it in .grad: the
    step is that coefficient times the unclipped step; a large max_grad_norm changes nothing."""
    runs = {}
    for max_norm in (None, 0.05, 1e6):
        prob = MLPProblem()
        opt = FisherNewton(prob.params, lr=0.5, max_grad_norm=max_norm)
        opt.step(prob.per_sample_losses)
        runs[max_norm] = (prob.flat() - prob.x0, [p.grad.clone() for p in prob.params])
    full, g = runs[None]
    ref = [t.clone().requires_grad_() for t in g]
    for r, t in zip(ref, g):
        r.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(ref, 0.05)
    coef = 0.05 / (torch.stack([t.norm() for t in g]).norm() + 1e-6)
    assert coef < 0.5  # clipping is active
    step, clipped = runs[0.05]
    assert torch.allclose(step, coef * full, rtol=1e-10, atol=0)
    for got, want in zip(clipped, ref):
        assert torch.allclose(got, want.grad, rtol=1e-12, atol=0)
    assert torch.equal(runs[1e6][0], full)
    with pytest.raises(ValueError, match="max_grad_norm"):
        FisherNewton(MLPProblem().params, max_grad_norm=0.0)


def test_weight_decay_is_decoupled_and_momentum_averages_the_gradient():
    """x₁ = x₀(1 − lr·wd) + Δx(g₀); then the step at x₁ preconditions (in x₁'s Fisher) the
    bias-corrected average m̂₂ = (β(1−β) g₀ + (1−β) g₁)/(1 − β²); a skipped step leaves the
    momentum buffers as they were."""
    lr, wd, beta = 0.3, 0.1, 0.5
    prob = MLPProblem()
    opt = FisherNewton(prob.params, lr=lr, damping=1.0, weight_decay=wd, momentum=beta)
    J0 = prob.per_sample_jacobian(prob.x0)
    opt.step(prob.per_sample_losses)
    dx0, _ = _dense_relative_step(J0, J0.mean(0), lr, 1.0)
    x1 = prob.x0 * (1 - lr * wd) + dx0
    assert (prob.flat() - x1).norm() / dx0.norm() < 1e-10
    J1 = prob.per_sample_jacobian(x1)
    m2 = (beta * (1 - beta) * J0.mean(0) + (1 - beta) * J1.mean(0)) / (1 - beta**2)
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in prob.params]
    x1_got = prob.flat().clone()

    def bad():
        losses = prob.per_sample_losses()
        return torch.cat([losses[:-1], losses[-1:] * float("nan")])

    opt.step(bad)
    assert int(opt.global_state["skipped_steps"]) == 1 and torch.equal(prob.flat(), x1_got)
    assert all(
        torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(prob.params, buffers)
    )
    opt.step(prob.per_sample_losses)
    dx1, _ = _dense_relative_step(J1, m2, lr, 1.0)
    x2 = x1 * (1 - lr * wd) + dx1
    assert (prob.flat() - x2).norm() / dx1.norm() < 1e-10
    for kwargs, match in [
        (dict(momentum=1.0), "momentum must be < 1"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
    ]:
        with pytest.raises(ValueError, match=match):
            FisherNewton(prob.params, **kwargs)
    opt = FisherNewton(prob.params, momentum=0.9, weight_decay=0.01)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 0.01
    assert {"lr", "damping", "momentum", "weight_decay"} <= set(FisherNewton._per_group)
