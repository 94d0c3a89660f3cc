"""RankOneNewton's default diagonal-plus-low-rank step against its formula, dense, in float64:

Λ = sqrt(v_t/(1 − β₂^t)),  v_t = β₂ v_{t−1} + (1 − β₂)(u ⊙ Hu)²,  δ = damping · mean(Λ),
P = diag(Λ + δ) + Y (ΩᵀY)₊⁺ Yᵀ,  x ← x − lr P⁻¹ m̂,  m̂ = bias-corrected EMA_β(g).
"""

from __future__ import annotations

import pytest
import torch
from _optim_problems import F64, MLPProblem

from torch_rankone import RankOneNewton
from torch_rankone._tensorlist import flatten, rademacher_like
from torch_rankone.optim.rank_one_newton import nystrom_core


def _nystrom_dense(Om: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Y (ΩᵀY)₊⁺ Yᵀ with the symmetrised core's non-positive eigenvalues dropped (by hand)."""
    W = Om.T @ Y
    theta, Q = torch.linalg.eigh((W + W.T) / 2)
    keep = theta > 1e-6 * theta.abs().max()
    core = Q[:, keep] @ torch.diag(1 / theta[keep]) @ Q[:, keep].T
    return Y @ core @ Y.T


@pytest.mark.parametrize("rank,init_probes", [(0, 1), (1, 1), (2, 1), (3, 1), (1, 4)])
def test_steps_equal_the_dense_formula(rank, init_probes):
    prob = MLPProblem()
    lr, damping, beta, beta2 = 0.3, 0.05, 0.9, 0.99
    seed = 7
    opt = RankOneNewton(
        prob.params,
        lr=lr,
        damping=damping,
        momentum=beta,
        beta2=beta2,
        rank=rank,
        init_probes=init_probes,
        generator=torch.Generator().manual_seed(seed),
    )
    probes = torch.Generator().manual_seed(seed)
    x = prob.x0.clone()
    v = torch.zeros_like(x)
    m = torch.zeros_like(x)
    Om, Ys = [], []
    for t in range(1, 4):
        H, g = prob.hessian(x), prob.grad(x)
        u = flatten(rademacher_like(prob.params, probes))
        h = H @ u
        sq = (u * h) ** 2
        if t == 1:  # the first call averages init_probes samples (u first)
            for _ in range(init_probes - 1):
                w = flatten(rademacher_like(prob.params, probes))
                sq = sq + (w * (H @ w)) ** 2
            sq = sq / init_probes
        v = beta2 * v + (1 - beta2) * sq
        lam = (v / (1 - beta2**t)).sqrt()
        delta = damping * lam.mean()
        m = beta * m + (1 - beta) * g
        m_hat = m / (1 - beta**t)
        Om, Ys = (Om + [u])[-rank:] if rank else [], (Ys + [h])[-rank:] if rank else []
        P = torch.diag(lam + delta)
        if rank:
            P = P + _nystrom_dense(torch.stack(Om, 1), torch.stack(Ys, 1))
        x_next = x - lr * torch.linalg.solve(P, m_hat)
        opt.step(prob.loss_closure())
        err = (prob.flat() - x_next).norm() / (x_next - x).norm()
        assert err < 1e-8, (t, float(err))
        x = prob.flat().clone()
    assert int(opt.global_state["skipped_steps"]) == 0


def test_nystrom_core_is_exact_on_the_sketch_and_psd():
    """For a PSD H the approximation reproduces H on the sketched directions; an indefinite
    core keeps only its positive part, so Y C Yᵀ stays positive semi-definite."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=gen, dtype=F64)
    H = A @ A.T
    Om = torch.randn(12, 3, generator=gen, dtype=F64)
    Y = H @ Om
    C = nystrom_core([[Om[:, j]] for j in range(3)], [[Y[:, j]] for j in range(3)])
    approx = Y @ C @ Y.T
    assert torch.allclose(approx @ Om, Y, rtol=1e-9, atol=1e-9 * float(Y.abs().max()))
    H_indef = H - 30 * torch.eye(12, dtype=F64)
    Y2 = H_indef @ Om
    C2 = nystrom_core([[Om[:, j]] for j in range(3)], [[Y2[:, j]] for j in range(3)])
    assert torch.linalg.eigvalsh(C2).min() >= -1e-12
    assert torch.linalg.eigvalsh(Y2 @ C2 @ Y2.T).min() >= -1e-8 * float(Y2.abs().max()) ** 2


def test_skipped_step_leaves_diagonal_momentum_and_sketches_untouched():
    prob = MLPProblem()
    opt = RankOneNewton(prob.params, rank=2, generator=torch.Generator().manual_seed(0))
    opt.step(prob.loss_closure())
    before = {
        k: v.clone() for p in prob.params for k, v in opt.state[p].items() if torch.is_tensor(v)
    }
    x = prob.flat().clone()
    opt.step(lambda: prob.loss() * float("nan"))
    after = {k: v for p in prob.params for k, v in opt.state[p].items()}
    assert torch.equal(prob.flat(), x)
    for key in ("hessian_sq_avg", "momentum_buffer"):
        assert torch.equal(after[key], before[key]), key
    assert int(opt.global_state["skipped_steps"]) == 1 and int(opt.global_state["step"]) == 1
    with pytest.warns(RuntimeWarning, match=r"counters\(\)\['skipped_steps'\] = 1") as rec:
        opt.step(prob.loss_closure())  # call 2, a sync point, reports the skipped call 1
    assert rec[0].filename == __file__


def test_options_are_validated():
    prob = MLPProblem()
    with pytest.raises(ValueError, match="preconditioner"):
        RankOneNewton(prob.params, preconditioner="full")
    with pytest.raises(ValueError, match="rank"):
        RankOneNewton(prob.params, rank=9)
    with pytest.raises(ValueError, match="isotropic"):
        RankOneNewton(prob.params, damping_mode="theory", hessian_lipschitz=1.0)
    with pytest.raises(ValueError, match="momentum"):
        RankOneNewton(prob.params, momentum=1.0)
    with pytest.raises(ValueError, match="beta2"):
        RankOneNewton(prob.params, beta2=1.0)


def test_nystrom_core_keeps_only_clearly_positive_curvature():
    """One sketch: ``1/θ`` for ``θ = ωᵀy > 0``, exactly 0 for ``θ = 0`` and ``θ < 0``; several:
    eigenvalues of the symmetrised ``ΩᵀY`` at or below ``rcond·max|θ|`` are dropped."""
    w = torch.tensor([1.0, 0.0], dtype=F64)
    for y, want in [([2.0, 5.0], 0.5), ([0.0, 5.0], 0.0), ([-2.0, 1.0], 0.0)]:
        C = nystrom_core([[w]], [[torch.tensor(y, dtype=F64)]])
        assert C.shape == (1, 1) and float(C) == want, (y, float(C))
    # two sketches of a diagonal H = diag(1, 1e-9): the 1e-9 direction is below rcond = 1e-6
    Om = torch.eye(2, dtype=F64)
    Y = torch.diag(torch.tensor([1.0, 1e-9], dtype=F64))
    C = nystrom_core([[Om[:, 0]], [Om[:, 1]]], [[Y[:, 0]], [Y[:, 1]]])
    assert torch.allclose(C, torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), atol=0)
    C = nystrom_core([[Om[:, 0]], [Om[:, 1]]], [[Y[:, 0]], [Y[:, 1]]], rcond=1e-10)
    assert torch.allclose(C, torch.diag(torch.tensor([1.0, 1e9], dtype=F64)), rtol=1e-12)
