"""Contracts of the distributed baselines that their update-rule tests leave open: the node
split's edge cases, the inputs' dtypes, the BFGS safeguard, ADIANA's ``w`` sequence, DINGO's
three direction cases and its line search, each against a dense float64 reference written
here from the methods' definitions."""

from __future__ import annotations

import math

import pytest
import torch
from _glm_reference import bfgs_direct_update
from torch.func import grad, hessian

from torch_rankone.distributed import Identity
from torch_rankone.distributed import baselines as bl
from torch_rankone.distributed.baselines.dingo import local_solve

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny products: one thread

F64 = torch.float64


def logistic_problem(n, m, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n * m, d, generator=g, dtype=F64)
    b = torch.where(torch.rand(n * m, generator=g) < 0.5, -1.0, 1.0).to(F64)
    x0 = scale * torch.randn(d, generator=g, dtype=F64)
    return A, b, x0


def local_P(A, b, n, i, lam):
    m = A.shape[0] // n
    rows = slice(i * m, (i + 1) * m)
    return lambda x: torch.log1p(torch.exp(-b[rows] * (A[rows] @ x))).mean() + lam / 2 * x @ x


def ref_grads(A, b, x, n, lam):
    return torch.stack([grad(local_P(A, b, n, i, lam))(x) for i in range(n)])


def ref_hessians(A, b, x, n, lam):
    return torch.stack([hessian(local_P(A, b, n, i, lam))(x) for i in range(n)])


def paired_problem():
    """Two nodes whose rows come in pairs (a, +1), (a, −1) with small integer features: the
    logistic gradient at 0 is exactly zero, ∇P(0) = 0 (0 is the optimum)."""
    A = torch.tensor(
        [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [0.0, 1.0, 3.0]], dtype=F64
    )
    return A, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)


# --- the node split and the inputs ----------------------------------------------------------


def test_nodes_with_empty_last_column_and_row_match_dense_reference():
    # the last node's last feature and last row are all zero: the block matrix of the gradient
    # sums must still have n·d rows and n·m columns
    n, m, d, lam = 2, 3, 3, 0.1
    A, b, x0 = logistic_problem(n, m, d, seed=1)
    A[m:, -1] = 0.0
    A[-1] = 0.0
    x = x0.clone()
    opt = bl.DistributedNewton([x], A, b, lam=lam, num_nodes=n)
    nodes = opt.nodes
    torch.testing.assert_close(
        nodes.gradients(x0, lam), ref_grads(A, b, x0, n, lam), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        nodes.local_hessians(x0, lam), ref_hessians(A, b, x0, n, lam), rtol=1e-12, atol=1e-14
    )
    opt.step()
    H, gr = ref_hessians(A, b, x0, n, lam).mean(0), ref_grads(A, b, x0, n, lam).mean(0)
    torch.testing.assert_close(x, x0 - torch.linalg.solve(H, gr), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_targets_take_the_features_dtype(dtype):
    # ±1 targets of another dtype give the float32 run of float32 targets, in float32
    A, b, x0 = logistic_problem(2, 4, 3, seed=2)
    A, x0 = A.float(), x0.float()
    runs = []
    for targets in (b.float(), b.to(dtype)):
        x = x0.clone()
        opt = bl.DistributedNewton([x], A, targets, num_nodes=2)
        loss = opt.step()
        assert loss.dtype == torch.float32 and opt.nodes.b.dtype == torch.float32
        runs.append((x, loss))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


@pytest.mark.parametrize("num_nodes", [True, 2.0, 0])
def test_num_nodes_must_be_a_positive_int(num_nodes):
    A, b, x0 = logistic_problem(2, 2, 3)
    with pytest.raises(ValueError, match=r"^num_nodes must be a positive integer"):
        bl.DistributedNewton([x0], A, b, num_nodes=num_nodes)


def test_dcgd_lr_error_names_lr():
    A, b, x0 = logistic_problem(2, 2, 3)
    with pytest.raises(ValueError, match=r"^lr must be > 0"):
        bl.DCGD([x0], A, b, Identity(), lr=0.0, num_nodes=2)


# --- BFGS --------------------------------------------------------------------------------


def test_bfgs_stays_at_an_exact_optimum_skipping_the_update():
    # ∇P(0) = 0 exactly: the step is 0, then s = y = 0 and yᵀs = 0 fails the curvature test
    # (the update would divide by yᵀs = 0)
    A, b = paired_problem()
    x = torch.zeros(3, dtype=F64)
    opt = bl.BFGS([x], A, b, lam=0.1, num_nodes=2)
    for _ in range(3):
        opt.step()
    assert torch.equal(x, torch.zeros(3, dtype=F64))
    assert opt.state[x]["skipped_updates"] == 2


def test_bfgs_curvature_threshold_is_relative_to_both_norms():
    # λ = 1 dominates the Hessian: yᵀs ≈ ‖y‖‖s‖, so the relative test with ε = 0.5 always
    # passes however small the steps get (an absolute-ish test would skip near the optimum)
    n, lam = 2, 1.0
    A, b, x0 = logistic_problem(n, 4, 3, seed=4)
    x = x0.clone()
    opt = bl.BFGS([x], A, b, lam=lam, num_nodes=n, curvature_eps=0.5)
    B, xr, x_old, g_old = ref_hessians(A, b, x0, n, lam).mean(0), x0.clone(), None, None
    for _ in range(4):
        opt.step()
        g = ref_grads(A, b, xr, n, lam).mean(0)
        if g_old is not None:  # the direct BFGS update of B
            B = bfgs_direct_update(B, xr - x_old, g - g_old)
        x_old, g_old = xr, g
        xr = xr - torch.linalg.solve(B, g)
        torch.testing.assert_close(x, xr, rtol=1e-10, atol=1e-13)
    assert opt.state[x]["skipped_updates"] == 0


# --- ADIANA ------------------------------------------------------------------------------


def test_adiana_without_compression_follows_the_dense_recursion():
    # ω = 0: p = 1, so w^{k+1} = y^k every iteration, α = 1 and g^k = ∇P(x^k)
    n, m, d, lam = 2, 4, 3, 0.1
    A, b, x0 = logistic_problem(n, m, d, seed=5)
    y = x0.clone()
    opt = bl.ADIANA([y], A, b, Identity(), lam=lam, num_nodes=n)
    tops = [torch.linalg.eigvalsh(A[i * m : (i + 1) * m].T @ A[i * m : (i + 1) * m] / m)[-1]
            for i in range(n)]  # fmt: skip
    L = 0.25 * float(max(tops)) + lam
    eta = 1 / (2 * L)
    theta1 = min(0.25, math.sqrt(eta * lam))
    gamma = eta / (2 * (theta1 + eta * lam))
    beta = 1 - gamma * lam
    yr, zr, wr, h = x0.clone(), x0.clone(), x0.clone(), torch.zeros(n, d, dtype=F64)
    for _ in range(4):
        opt.step()
        xr = theta1 * zr + 0.5 * wr + (0.5 - theta1) * yr
        g = h.mean(0) + (ref_grads(A, b, xr, n, lam) - h).mean(0)
        h = ref_grads(A, b, wr, n, lam)
        y_new = xr - eta * g
        zr = beta * zr + (1 - beta) * xr + gamma / eta * (y_new - xr)
        wr, yr = yr, y_new
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[y]["w"], wr, rtol=1e-12, atol=1e-12)


# --- DINGO: the local solves and the three direction cases --------------------------------


def rot(t):
    c, s = math.cos(t), math.sin(t)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def test_local_solve_uses_the_pseudo_inverse_where_cholesky_fails():
    # node 0 fails at its first pivot (zero first row/column), node 1 at its second
    # (indefinite), node 2 is positive definite
    H = torch.stack([
        torch.diag(torch.tensor([0.0, 2.0], dtype=F64)),
        rot(0.7) @ torch.diag(torch.tensor([-1.0, 4.0], dtype=F64)) @ rot(0.7).T,
        rot(0.3) @ torch.diag(torch.tensor([1.0, 4.0], dtype=F64)) @ rot(0.3).T,
    ])  # fmt: skip
    v = torch.tensor([[1.0, 3.0], [2.0, -1.0], [0.5, 1.5]], dtype=F64)
    expected = torch.stack([torch.linalg.pinv(Hi) @ vi for Hi, vi in zip(H, v)])
    torch.testing.assert_close(local_solve(H, v), expected, rtol=1e-12, atol=1e-12)


def dingo_for(theta, phi, d=2, n=2):
    A, b, x0 = logistic_problem(n, 2, d)
    return bl.DINGO([x0], A, b, num_nodes=n, theta=theta, phi=phi)


def ref_direction(H, g, theta, phi):
    """Cases 1–3 of the class docstring with pseudo-inverses of the stacked H̃_i = [H_i; φI]."""
    d = H.shape[1]
    h, bound = (H @ g).mean(0), theta * g @ g
    p = -torch.stack([torch.linalg.pinv(Hi) @ g for Hi in H]).mean(0)
    if -p @ h >= bound:
        return p, h, 1
    Ht = [torch.cat([Hi, phi * torch.eye(d, dtype=F64)]) for Hi in H]
    gt = torch.cat([g, torch.zeros(d, dtype=F64)])
    q = torch.stack([torch.linalg.pinv(T) @ gt for T in Ht])
    if q.mean(0) @ h >= bound:
        return -q.mean(0), h, 2
    ps = []
    for qi, T in zip(q, Ht):
        Kh = torch.linalg.pinv(T.T @ T) @ h
        lam_i = 0.0 if qi @ h >= bound else (bound - qi @ h) / (Kh @ h)
        ps.append(-qi - lam_i * Kh)
    return torch.stack(ps).mean(0), h, 3


def check_direction(H, g, theta, phi, case, sent, tol=1e-12):
    opt = dingo_for(theta, phi, d=H.shape[1], n=H.shape[0])
    state = {"cases": [5, 7, 9]}
    p, h, vectors = opt._direction(state, H, g)
    p_ref, h_ref, case_ref = ref_direction(H, g, theta, phi)
    assert case_ref == case  # the construction reaches the intended case
    torch.testing.assert_close(p, p_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=1e-14, atol=1e-14)
    assert vectors == sent
    expected = [5, 7, 9]
    expected[case - 1] += 1
    assert state["cases"] == expected


def test_dingo_case_1_includes_its_boundary():
    # one node, H = I, θ = 1: ⟨H^† g, h⟩ = θ‖g‖² exactly, which case 1 accepts
    H = torch.eye(2, dtype=F64)[None]
    check_direction(H, torch.tensor([1.0, 0.0], dtype=F64), 1.0, 0.5, case=1, sent=2)


def test_dingo_case_2_with_an_indefinite_local_hessian():
    # node 1 is indefinite (pseudo-inverse path): ⟨(1/n)Σ H_i^† g, h⟩ ≈ 0.35‖g‖² < θ‖g‖² = 0.4
    # ≤ ⟨(1/n)Σ H̃_i^† g̃, h⟩ ≈ 0.47‖g‖² with φ = 1
    H = torch.stack([
        torch.diag(torch.tensor([1.0, 4.0], dtype=F64)),
        rot(0.7) @ torch.diag(torch.tensor([-1.0, 4.0], dtype=F64)) @ rot(0.7).T,
    ])  # fmt: skip
    check_direction(H, torch.tensor([0.0, 1.0], dtype=F64), 0.4, 1.0, case=2, sent=3)


def test_dingo_case_3_mixes_satisfied_and_corrected_nodes():
    # node 0 is singular at its first pivot, φ² underflows to 0 (so H̃_0ᵀH̃_0 is singular too);
    # ⟨H̃_i^† g̃, h⟩ ≈ (−0.03, 0.59)‖g‖² against θ = 0.4: node 1 keeps λ_1 = 0, node 0 not
    H = torch.stack([
        torch.diag(torch.tensor([0.0, 2.0], dtype=F64)),
        rot(0.7) @ torch.diag(torch.tensor([1.0, 4.0], dtype=F64)) @ rot(0.7).T,
    ])  # fmt: skip
    check_direction(H, torch.tensor([1.0, 0.2], dtype=F64), 0.4, 1e-200, case=3, sent=4, tol=1e-10)


def test_dingo_case_3_with_well_conditioned_nodes():
    # non-commuting diag(1, 10³) and its rotation, φ = 10: case 3 with θ = 30 (every node corrected)
    H = torch.stack([
        torch.diag(torch.tensor([1.0, 1e3], dtype=F64)),
        rot(0.3) @ torch.diag(torch.tensor([1.0, 1e3], dtype=F64)) @ rot(0.3).T,
    ])  # fmt: skip
    check_direction(H, torch.tensor([0.3, 1.0], dtype=F64), 30.0, 10.0, case=3, sent=4)


# --- DINGO: the line search ----------------------------------------------------------------


def ref_dingo_case1_step(A, b, x, n, lam, rho, alphas):
    """One case-1 DINGO iteration: p = −(1/n)Σ H_i^{-1} g, then the first α of ``alphas`` with
    ‖∇P(x + αp)‖² ≤ ‖g‖² + 2αρ⟨p, h⟩ (the last one if none passes)."""
    g = ref_grads(A, b, x, n, lam).mean(0)
    H = ref_hessians(A, b, x, n, lam)
    p = -torch.linalg.solve(H, g.expand(n, -1)).mean(0)
    h = (H @ g).mean(0)
    for tried, alpha in enumerate(alphas, 1):
        gn = ref_grads(A, b, x + alpha * p, n, lam).mean(0)
        if gn @ gn <= g @ g + 2 * alpha * rho * p @ h:
            return x + alpha * p, alpha, tried, True
    return x + alpha * p, alpha, tried, False


def test_dingo_failed_line_searches_take_the_last_step_and_are_counted():
    # ρ close to 1 with one node: ⟨p, h⟩ = −‖g‖², so the bound ‖g‖²(1 − 2ρ) < 0 is never met
    n, lam, rho = 1, 0.1, 0.999
    A, b, x0 = logistic_problem(n, 6, 3, seed=6)
    x = x0.clone()
    opt = bl.DINGO([x], A, b, lam=lam, num_nodes=n, rho=rho, max_backtracks=0)
    xr = x0.clone()
    for _ in range(2):
        opt.step()
        xr, alpha, tried, ok = ref_dingo_case1_step(A, b, xr, n, lam, rho, [1.0])
        assert not ok and tried == 1
        torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12)
    assert opt.state[x]["line_search_failures"] == 2
    # ∇P_i(x^0), H_i g, H_i^† g and one trial, then the two vectors and one trial
    assert opt.history[-1]["bits_theory"] == 32 * 3 * (4 + 3)


def test_dingo_step_cap_tries_the_cap_once():
    # cap 1/2 in the first iteration: α ∈ {1/2, 1/4} (1/2 not twice), both fail as above
    n, lam, rho = 1, 0.1, 0.999
    A, b, x0 = logistic_problem(n, 6, 3, seed=6)
    x = x0.clone()
    opt = bl.DINGO([x], A, b, lam=lam, num_nodes=n, rho=rho, max_backtracks=2,
                   step_cap=(0.5, 1))  # fmt: skip
    opt.step()
    xr, alpha, tried, ok = ref_dingo_case1_step(A, b, x0, n, lam, rho, [0.5, 0.25])
    assert not ok and alpha == 0.25
    torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12)
    assert opt.history[-1]["bits_theory"] == 32 * 3 * (3 + 2)


@pytest.mark.parametrize("rho,seed", [(0.3, 7), (0.45, 8)])
def test_dingo_backtracking_matches_reference(rho, seed):
    # far from the optimum the full step is rejected and α = 2^{−j} < 1 is accepted
    n, lam, mb = 2, 0.05, 6
    A, b, x0 = logistic_problem(n, 5, 3, seed=seed, scale=3.0)
    x = x0.clone()
    opt = bl.DINGO([x], A, b, lam=lam, num_nodes=n, rho=rho, max_backtracks=mb)
    xr, alphas, trials = x0.clone(), [], 0
    for _ in range(4):
        opt.step()
        xr, alpha, tried, ok = ref_dingo_case1_step(A, b, xr, n, lam, rho,
                                                    [2.0**-j for j in range(mb + 1)])  # fmt: skip
        assert ok
        alphas.append(alpha)
        trials += tried
        torch.testing.assert_close(x, xr, rtol=1e-10, atol=1e-12)
    assert min(alphas) < 1
    assert opt.state[x]["cases"] == [4, 0, 0]
    assert opt.history[-1]["bits_theory"] == n * 32 * 3 * (1 + 2 * 4 + trials)


def test_dingo_accepts_the_unit_step_at_an_exact_optimum():
    # ∇P(0) = 0 exactly: p = 0, and both the case-1 test and
    # the line search hold with equality (0 ≥ θ·0, 0 ≤ 0 + 0), so one trial is accepted
    A, b = paired_problem()
    x = torch.zeros(3, dtype=F64)
    opt = bl.DINGO([x], A, b, lam=0.1, num_nodes=2)
    opt.step()
    assert torch.equal(x, torch.zeros(3, dtype=F64))
    assert opt.state[x]["cases"] == [1, 0, 0] and opt.state[x]["line_search_failures"] == 0
    assert opt.history[-1]["bits_theory"] == 2 * 32 * 3 * (1 + 2 + 1)
