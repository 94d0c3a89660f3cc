"""Contracts of ``torch_rankone.linalg`` against independent float64 dense references: the dense
``d×d`` solvers (shifted, Newton, Cholesky factor solves and rank-one updates, the cubic step),
the low-rank spectrum and shifted solve, the Neumann diagnostics, CG, LiSSA and the
Sherman–Morrison inverse."""

from __future__ import annotations

import math
import re
import sys
import warnings

import pytest
import torch

from torch_rankone.linalg import (
    IncrementalInverse,
    NeumannDivergenceError,
    NeumannResult,
    NotPositiveDefiniteError,
    SingularSystemError,
    cg_ihvp,
    cholesky_rank_one_update,
    cubic_step,
    lissa_ihvp,
    lowrank_solve,
    lowrank_spectrum,
    neumann_ihvp,
    neumann_ritz_values,
    neumann_series,
    newton_direction,
    shifted,
    shifted_lowrank_solve,
    solve_with_factor,
)

F64 = torch.float64


def _assert_attributed_to_caller(w: warnings.WarningMessage) -> None:
    # mutmut's trampolines add stack frames: the attribution is checked outside mutation runs
    if "mutmut" not in sys.modules:
        assert w.filename == __file__


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _sym(d: int, seed: int, eigs: list[float] | None = None) -> torch.Tensor:
    """A symmetric matrix with the given eigenvalues (random ones in [1, 10] by default)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    w = (
        torch.tensor(eigs, dtype=F64)
        if eigs is not None
        else 1 + 9 * torch.rand(d, generator=gen, dtype=F64)
    )
    return (Q * w) @ Q.T


# ---------------------------------------------------------------- shifted


def test_shifted_adds_lambda_to_the_diagonal_only_and_copies():
    H = torch.arange(9, dtype=F64).reshape(3, 3)
    before = H.clone()
    out = shifted(H, 0.25)
    torch.testing.assert_close(out, before + 0.25 * torch.eye(3, dtype=F64), rtol=0, atol=0)
    assert torch.equal(H, before)  # the input is untouched


# ---------------------------------------------------------------- newton_direction


def test_newton_direction_solves_a_pd_system():
    H = _sym(5, 0)
    g = torch.linspace(-1, 2, 5, dtype=F64)
    y = newton_direction(H, g)
    assert y.shape == (5,)
    assert _rel(y, torch.linalg.solve(H, g)) < 1e-13


def test_newton_direction_is_all_nan_for_an_indefinite_matrix():
    H = _sym(4, 1, [-1.0, 1.0, 2.0, 3.0])
    y = newton_direction(H, torch.ones(4, dtype=F64))
    assert y.shape == (4,) and torch.isnan(y).all()


# ---------------------------------------------------------------- solve_with_factor


def test_solve_with_factor_solves_from_a_lower_cholesky_factor():
    H = _sym(6, 2)
    L = torch.linalg.cholesky(H)
    g = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = torch.linalg.solve(H, g)
    assert _rel(solve_with_factor(L, g), expected) < 1e-13  # ok defaults to True
    assert _rel(solve_with_factor(L, g, torch.tensor(True)), expected) < 1e-13
    assert torch.isnan(solve_with_factor(L, g, False)).all()
    assert torch.isnan(solve_with_factor(L, g, torch.tensor(False))).all()


# ---------------------------------------------------------------- Cholesky update


@pytest.mark.parametrize("alpha", [0.7, torch.tensor(2.5, dtype=F64)])
def test_cholesky_rank_one_update_is_the_cholesky_factor_of_the_update(alpha):
    d = 7
    H = _sym(d, 4)
    L = torch.linalg.cholesky(H)
    z = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=F64)
    out, ok = cholesky_rank_one_update(L, z, alpha)
    expected = torch.linalg.cholesky(H + float(alpha) * torch.outer(z, z))
    assert ok is True
    # the Cholesky factor is unique (positive diagonal): compare the factors themselves
    assert float((out - expected).abs().max()) < 1e-12 * float(expected.abs().max())


def test_cholesky_rank_one_downdate_inside_the_pd_cone():
    d = 6
    H = _sym(d, 6)
    L = torch.linalg.cholesky(H)
    z = torch.randn(d, generator=torch.Generator().manual_seed(7), dtype=F64)
    # the largest α < 0 keeping H + α z zᵀ PD is −1/(zᵀH⁻¹z); take 60 % of it
    alpha = -0.6 / float(z @ torch.linalg.solve(H, z))
    out, ok = cholesky_rank_one_update(L, z, alpha)
    expected = torch.linalg.cholesky(H + alpha * torch.outer(z, z))
    assert ok is True
    assert float((out - expected).abs().max()) < 1e-11 * float(expected.abs().max())


def test_cholesky_rank_one_downdate_out_of_the_pd_cone_is_not_ok():
    d = 5
    H = _sym(d, 8)
    L = torch.linalg.cholesky(H)
    z = torch.randn(d, generator=torch.Generator().manual_seed(9), dtype=F64)
    alpha = -1.5 / float(z @ torch.linalg.solve(H, z))  # H + α z zᵀ is indefinite
    assert float(torch.linalg.eigvalsh(H + alpha * torch.outer(z, z))[0]) < 0
    out, ok = cholesky_rank_one_update(L, z, alpha)
    assert ok is False
    assert out.shape == (d, d)


def test_cholesky_rank_one_update_with_a_non_finite_vector_is_not_ok():
    L = torch.eye(3, dtype=F64)
    z = torch.tensor([1.0, float("inf"), 0.0], dtype=F64)
    _, ok = cholesky_rank_one_update(L, z, 1.0)
    assert ok is False


# ---------------------------------------------------------------- cubic_step


def _cubic_model(H: torch.Tensor, g: torch.Tensor, M: float, s: torch.Tensor) -> float:
    return float(g @ s + 0.5 * s @ H @ s + M / 6 * s.norm() ** 3)


def _assert_cubic_optimal(H, g, M, s, tol):
    """Nesterov–Polyak: s is the global minimiser iff (H + M r/2 I) s = −g, r = ‖s‖, and
    H + M r/2 I ⪰ 0."""
    r = float(s.norm())
    A = H + (M * r / 2) * torch.eye(H.shape[0], dtype=F64)
    assert float((A @ s + g).norm()) <= tol * float(g.norm())
    assert float(torch.linalg.eigvalsh(A)[0]) >= -tol * float(H.abs().max())


@pytest.mark.parametrize("M", [0.3, 5.0])
def test_cubic_step_pd_is_the_global_minimiser(M):
    H = _sym(6, 10)
    g = torch.randn(6, generator=torch.Generator().manual_seed(11), dtype=F64)
    s = cubic_step(H, g, M)
    assert s.shape == (6,) and s.dtype == F64
    _assert_cubic_optimal(H, g, M, s, 1e-12)
    # a cubic step is shorter than the Newton step
    assert float(s.norm()) < float(torch.linalg.solve(H, g).norm())


def test_cubic_step_indefinite_easy_case_is_the_global_minimiser():
    H = _sym(5, 12, [-2.0, -0.5, 0.3, 1.0, 4.0])
    g = torch.randn(5, generator=torch.Generator().manual_seed(13), dtype=F64)
    M = 1.5
    s = cubic_step(H, g, M)
    _assert_cubic_optimal(H, g, M, s, 1e-12)
    assert float(s.norm()) > 2 * 2.0 / M  # r > r_lo = −2 μ_min / M
    # better than a sampled set of competitors (global, not a local minimiser)
    gen = torch.Generator().manual_seed(14)
    best = _cubic_model(H, g, M, s)
    for _ in range(200):
        other = s + 0.3 * torch.randn(5, generator=gen, dtype=F64)
        assert _cubic_model(H, g, M, other) > best


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cubic_step_hard_case_goes_along_the_bottom_eigenvector(dtype):
    # g orthogonal to the bottom eigenvector: r = r_lo = −2 μ_min / M and the missing norm is
    # taken along that eigenvector (either sign is a global minimiser).
    eigs = torch.tensor([-2.0, 2.0, 3.0, 5.0], dtype=F64)
    gen = torch.Generator().manual_seed(15)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64))
    H = (Q * eigs) @ Q.T
    g = Q[:, 1:] @ torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    M = 2.0
    s = cubic_step(H.to(dtype), g.to(dtype), M)
    assert s.dtype == dtype
    s = s.double()
    tol = 1e-12 if dtype == F64 else 1e-5
    r_lo = 2 * 2.0 / M
    assert abs(float(s.norm()) - r_lo) < tol * r_lo
    _assert_cubic_optimal(H, g, M, s, 10 * tol)
    # the part orthogonal to the bottom eigenvector is −(H + 2I)⁻¹ g there
    gt = Q.T @ g
    expected_rest = -gt[1:] / (eigs[1:] + M * r_lo / 2)
    assert float(((Q.T @ s)[1:] - expected_rest).abs().max()) < tol
    bottom = abs(float(Q[:, 0] @ s))
    assert abs(bottom - math.sqrt(r_lo**2 - float(expected_rest.norm()) ** 2)) < tol


def test_cubic_step_zero_gradient_with_negative_curvature():
    # g = 0: the minimisers of ½ sᵀHs + (M/6)‖s‖³ are ± r_lo times the bottom eigenvector
    H = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=F64))
    s = cubic_step(H, torch.zeros(3, dtype=F64), 4.0)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(
        s.abs(), torch.tensor([0.5, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-15
    )


def test_cubic_step_small_gradient_near_the_hard_case_is_solved_by_the_iteration():
    # ‖g‖ = 0.01 with a relative 1e-6 component along the bottom eigenvector: far above
    # rounding, so no hard case: r > r_lo and that component of s opposes g's
    eigs = torch.tensor([-2.0, 2.0, 3.0, 5.0], dtype=F64)
    Q, _ = torch.linalg.qr(
        torch.randn(4, 4, generator=torch.Generator().manual_seed(18), dtype=F64)
    )
    H = (Q * eigs) @ Q.T
    g = 0.01 * (Q[:, 1:] @ torch.tensor([0.6, -0.6, 0.5], dtype=F64) + 1e-6 * Q[:, 0])
    s = cubic_step(H, g, 2.0)
    r = float(s.norm())
    assert r > 2.0 + 1e-9 and float(Q[:, 0] @ s) < 0
    # backward error: μ_min + M r/2 ≈ 5e-9 is resolved to about eps·|μ_min| (measured 2.6e-8)
    A = H + r * torch.eye(4, dtype=F64)
    assert float((A @ s + g).norm()) <= 1e-7 * float(H.norm()) * r


def test_cubic_step_newton_iteration_converges_in_a_few_steps():
    # Newton on the secular equation: PD cases converge in ~5 steps, indefinite in ~6; a
    # bisection would need ~50 for the same accuracy
    H = _sym(6, 10)
    g = torch.randn(6, generator=torch.Generator().manual_seed(11), dtype=F64)
    for M, gs in ((0.3, g), (5.0, g), (5.0, 1e-4 * g)):
        _assert_cubic_optimal(H, gs, M, cubic_step(H, gs, M, max_iter=8), 1e-13)
    H = _sym(5, 12, [-2.0, -0.5, 0.3, 1.0, 4.0])
    g = torch.randn(5, generator=torch.Generator().manual_seed(13), dtype=F64)
    _assert_cubic_optimal(H, g, 1.5, cubic_step(H, g, 1.5, max_iter=9), 1e-13)


def test_cubic_step_failed_eigendecomposition_gives_nan(monkeypatch):
    def failing_eigh(A):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    s = cubic_step(torch.eye(3, dtype=F64), torch.ones(3, dtype=F64), 1.0)
    assert s.shape == (3,) and s.dtype == F64 and torch.isnan(s).all()


def test_cubic_step_with_zero_regularisation_is_the_newton_step_or_nan():
    H = _sym(4, 16)
    g = torch.ones(4, dtype=F64)
    assert _rel(cubic_step(H, g, 0.0), -torch.linalg.solve(H, g)) < 1e-13
    assert torch.isnan(cubic_step(_sym(4, 16, [-1.0, 1.0, 2.0, 3.0]), g, 0.0)).all()


@pytest.mark.parametrize("where", ["H", "g", "g_axis"])
def test_cubic_step_non_finite_input_gives_nan(where):
    H, g = _sym(3, 17), torch.ones(3, dtype=F64)
    if where == "H":
        H[0, 1] = H[1, 0] = float("nan")
    elif where == "g":
        g[2] = float("inf")
    else:  # H = I, g = (inf, 0, 0): the eigenbasis would keep the zeros finite
        H, g = torch.eye(3, dtype=F64), torch.tensor([float("inf"), 0.0, 0.0], dtype=F64)
    s = cubic_step(H, g, 1.0)
    assert s.shape == (3,) and torch.isnan(s).all()


def test_cubic_step_gradient_along_negative_curvature_is_the_easy_case():
    # A gradient component along the bottom eigenvector, however small, keeps r above r_lo
    # (w(r) → ∞ as r → r_lo); here the other components alone have norm below r_lo at r_lo, so
    # taking the hard case would leave the optimality conditions violated (a real bug, fixed).
    eigs = torch.tensor([-1.0, 2.0, 3.0, 5.0], dtype=F64)
    Q, _ = torch.linalg.qr(
        torch.randn(4, 4, generator=torch.Generator().manual_seed(15), dtype=F64)
    )
    H = (Q * eigs) @ Q.T
    M = 2.0
    for gamma in (1e-6, 0.4):
        g = Q[:, 1:] @ torch.tensor([0.3, -0.2, 0.1], dtype=F64) + gamma * Q[:, 0]
        s = cubic_step(H, g, M)
        assert float(s.norm()) > 1.0  # r > r_lo = 1
        _assert_cubic_optimal(H, g, M, s, 1e-8)


# ---------------------------------------------------------------- IncrementalInverse


def test_incremental_inverse_defaults_and_weighted_updates():
    inc = IncrementalInverse(1, 0.5)  # dim = 1 is allowed
    assert inc.inverse.dtype == F64 and inc.dim == 1 and inc.damping == 0.5
    torch.testing.assert_close(inc.inverse, torch.tensor([[2.0]], dtype=F64), rtol=0, atol=0)
    inc = IncrementalInverse(3, 0.5, dtype=torch.float32)
    assert inc.inverse.dtype == torch.float32
    M = 0.5 * torch.eye(3, dtype=F64)
    gen = torch.Generator().manual_seed(20)
    for w in (2.0, 0.25, 3.0):
        v = torch.randn(3, generator=gen, dtype=F64)
        inc.update(v, weight=w)  # a float64 vector into a float32 inverse
        M += w * torch.outer(v, v)
    assert inc.num_updates == 3
    assert _rel(inc.inverse, torch.linalg.inv(M)) < 1e-5
    # solve converts its right-hand side to the inverse's dtype, and takes matrices
    B = torch.randn(3, 2, generator=gen, dtype=F64)
    X = inc.solve(B)
    assert X.dtype == torch.float32 and X.shape == (3, 2)
    assert _rel(X, torch.linalg.solve(M, B)) < 1e-5


def test_incremental_inverse_stays_exactly_symmetric():
    gen = torch.Generator().manual_seed(21)
    inc = IncrementalInverse(6, 1.0)
    for _ in range(20):
        inc.update(torch.randn(6, generator=gen, dtype=F64), weight=0.7)
    assert torch.equal(inc.inverse, inc.inverse.T)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("inf"), float("nan")])
def test_incremental_inverse_rejects_bad_damping(damping):
    with pytest.raises(
        ValueError,
        match=re.escape(f"IncrementalInverse: damping must be > 0 and finite, got {damping}"),
    ):
        IncrementalInverse(2, damping)


def test_incremental_inverse_rejects_bad_dim_and_shape():
    with pytest.raises(ValueError, match=re.escape("IncrementalInverse: dim must be >= 1, got 0")):
        IncrementalInverse(0, 1.0)
    inc = IncrementalInverse(2, 1.0)
    with pytest.raises(
        ValueError, match=re.escape("IncrementalInverse.update: v must have shape (2,)")
    ):
        inc.update(torch.ones(2, 1))


def test_incremental_inverse_singularity_threshold_is_1e3_eps():
    # λ = 1, v = e1, w = −(1 − δ): 1 + w vᵀM⁻¹v = δ exactly (Sterbenz); refused iff δ ≤ 1e3·eps
    eps = torch.finfo(F64).eps
    e1 = torch.tensor([1.0, 0.0], dtype=F64)
    fine = IncrementalInverse(2, 1.0)
    fine.update(e1, weight=-(1 - 1000.5 * eps))
    assert fine.num_updates == 1
    assert float(fine.inverse[0, 0]) == pytest.approx(1 / (1000.5 * eps), rel=1e-12)
    refused = IncrementalInverse(2, 1.0)
    with pytest.raises(
        SingularSystemError,
        match=re.escape(
            "IncrementalInverse.update: 1 + w vᵀM⁻¹v = 2.22e-13; the update makes M singular"
        ),
    ):
        refused.update(e1, weight=-(1 - 1000 * eps))
    with pytest.raises(SingularSystemError, match="= inf;"):
        refused.update(e1, weight=float("inf"))
    with pytest.raises(SingularSystemError, match="= nan;"):
        refused.update(torch.tensor([float("nan"), 0.0], dtype=F64))
    assert refused.num_updates == 0
    torch.testing.assert_close(refused.inverse, torch.eye(2, dtype=F64), rtol=0, atol=0)


# ------------------------------------------------------------------------------- low-rank spectrum


def test_lowrank_spectrum_is_the_operators_spectrum_plus_c():

    gen = torch.Generator().manual_seed(30)
    n, k, c = 9, 3, 0.4
    U = torch.randn(n, k, generator=gen, dtype=F64)
    C = torch.randn(k, k, generator=gen, dtype=F64)
    C = C + C.T  # symmetric, indefinite
    spec = lowrank_spectrum(U.T @ U, C, c)
    dense = torch.linalg.eigvalsh(c * torch.eye(n, dtype=F64) + U @ C @ U.T)
    # the k eigenvalues that differ from c, then c itself (which is also the other n − k)
    moved = dense[(dense - c).abs().argsort(descending=True)[:k]].sort().values
    assert spec.shape == (k + 1,)
    torch.testing.assert_close(spec[:k], moved, rtol=0, atol=1e-12)
    assert float(spec[k]) == c


def test_lowrank_spectrum_clamps_rounding_negative_gram_eigenvalues():

    # G = UᵀU of two equal columns, with a tiny negative eigenvalue from rounding: its square
    # root would be NaN without the clamp
    G = torch.tensor([[1.0, 1.0], [1.0, 1.0 - 1e-15]], dtype=F64)
    assert float(torch.linalg.eigvalsh(G)[0]) < 0
    spec = lowrank_spectrum(G, torch.eye(2, dtype=F64), 0.5)
    torch.testing.assert_close(spec, torch.tensor([0.5, 2.5, 0.5], dtype=F64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- lowrank_solve


def _dense_lowrank(c, U, C, g):
    Ud = torch.stack([u.double() for u in U], dim=1)
    M = c * torch.eye(Ud.shape[0], dtype=F64) + Ud @ torch.as_tensor(C, dtype=F64) @ Ud.T
    return torch.linalg.solve(M, g.double())


def test_lowrank_solve_takes_c_as_nested_lists_and_returns_lists_unchecked():
    gen = torch.Generator().manual_seed(40)
    g = torch.randn(6, generator=gen, dtype=F64)
    U = [torch.randn(6, generator=gen, dtype=F64) for _ in range(2)]
    C = [[0.5, 0.25], [0.25, 1.0]]  # Python floats: a float32 tensor by default, used in float64
    expected = _dense_lowrank(0.3, U, C, g)
    assert _rel(lowrank_solve(0.3, U, C, g), expected) < 1e-13
    # check=False keeps the caller's structure too: a list in, a list out
    y = lowrank_solve(0.3, [[u] for u in U], C, [g], check=False)
    assert isinstance(y, list) and len(y) == 1
    assert _rel(y[0], expected) < 1e-13


def test_lowrank_solve_n_equal_k_with_negative_c_is_solved_densely():
    # N = k = 1: the operator is c + 2 u² = 1 > 0 although c < 0 (c is no eigenvalue for N ≤ k)
    y = lowrank_solve(
        -1.0,
        [torch.tensor([1.0], dtype=F64)],
        [[2.0]],
        torch.tensor([3.0], dtype=F64),
        require_pd=True,
    )
    assert float(y) == 3.0


def test_lowrank_solve_singular_message_reports_the_spectrum():
    # c = 1, u = 2 e1 (G = 4), C = −0.2499...: eigenvalues {1 − 4·0.2499999, 1} exactly known
    u = torch.tensor([2.0, 0.0, 0.0], dtype=F64)
    g = torch.ones(3, dtype=F64)
    with pytest.raises(SingularSystemError) as exc:
        lowrank_solve(2.0, [u], [[-0.49999999999999]], g)
    lam = 2.0 - 4 * 0.49999999999999
    assert str(exc.value) == (
        "lowrank_solve: the operator c·I + U C Uᵀ (N=3, k=1, c=2) is singular or too "
        f"ill-conditioned for torch.float64: eigenvalues (with c) range over [{lam:.3g}, 2], "
        f"|λ|min/|λ|max = {lam / 2:.2e} <= rcond = 2.2e-14. Increase the damping c, use float64, "
        "or pass a smaller rcond."
    )


def test_lowrank_solve_zero_operator_is_singular_with_ratio_zero():
    with pytest.raises(SingularSystemError, match=re.escape("|λ|min/|λ|max = 0.00e+00 <= rcond")):
        lowrank_solve(0.0, [torch.ones(3, dtype=F64)], [[0.0]], torch.ones(3, dtype=F64))


def test_lowrank_solve_rcond_is_a_strict_threshold_defaulting_to_100_eps():
    eps = torch.finfo(F64).eps
    e1 = torch.tensor([1.0, 0.0], dtype=F64)
    g = torch.tensor([1.0, 1.0], dtype=F64)
    # spectrum {1 − (1 − 100.5 eps), 1} = {100.5 eps, 1}: just above the default rcond
    y = lowrank_solve(1.0, [e1], [[-(1 - 100.5 * eps)]], g)
    assert float(y[0]) == pytest.approx(1 / (100.5 * eps), rel=1e-12) and float(y[1]) == 1.0
    # spectrum {0.5, 1}: |λ|min/|λ|max = 0.5 is refused at rcond = 0.5, accepted just below
    with pytest.raises(SingularSystemError, match=re.escape("= 5.00e-01 <= rcond = 5.0e-01")):
        lowrank_solve(1.0, [e1], [[-0.5]], g, rcond=0.5)
    torch.testing.assert_close(
        lowrank_solve(1.0, [e1], [[-0.5]], g, rcond=0.49),
        torch.tensor([2.0, 1.0], dtype=F64),
        rtol=0,
        atol=1e-15,
    )


def test_lowrank_solve_require_pd_refuses_a_psd_singular_operator():
    # c = 0 with N > k: the spectrum's minimum is exactly 0; with the singularity check disabled
    # (rcond < 0) require_pd still refuses it
    with pytest.raises(NotPositiveDefiniteError) as exc:
        lowrank_solve(
            0.0,
            [torch.ones(3, dtype=F64)],
            [[1.0]],
            torch.ones(3, dtype=F64),
            require_pd=True,
            rcond=-1.0,
        )
    assert str(exc.value) == (
        "lowrank_solve: c·I + U C Uᵀ is not positive definite: its smallest eigenvalue is 0 "
        "(c = 0). Raise c by more than -0 to make it positive definite."
    )


def test_lowrank_solve_not_pd_message_gives_the_needed_shift():
    u = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    with pytest.raises(NotPositiveDefiniteError) as exc:
        lowrank_solve(0.5, [u], [[-2.0]], torch.ones(3, dtype=F64), require_pd=True)
    assert str(exc.value).endswith(
        "its smallest eigenvalue is -1.5 (c = 0.5). Raise c by more than 1.5 to make it "
        "positive definite."
    )


def test_lowrank_solve_input_error_messages():
    g = torch.ones(3, dtype=F64)
    cases = [
        (
            lambda: lowrank_solve(1.0, torch.ones(1, 3, dtype=F64), [[1.0]], g),
            TypeError,
            "lowrank_solve: U must be a sequence of k vectors (columns), not a tensor",
        ),
        (
            lambda: lowrank_solve(1.0, [], torch.zeros(0, 0), g),
            ValueError,
            "lowrank_solve: U must have at least one column",
        ),
        (lambda: lowrank_solve(1.0, [g], [[1.0]], []), ValueError, "lowrank_solve: g is empty"),
        (
            lambda: lowrank_solve(1.0, [g], [[float("inf")]], g),
            ValueError,
            "lowrank_solve: C has non-finite entries",
        ),
        (
            lambda: lowrank_solve(1.0, [g, g], [[1.0, 1.0 + 1e-9], [1.0, 1.0]], g),
            ValueError,
            "lowrank_solve: C must be symmetric (the operator is a symmetric matrix)",
        ),
        (
            lambda: lowrank_solve(1.0, [g], [[1.0]], g, require_pd=True, check=False),
            ValueError,
            "lowrank_solve: require_pd=True needs check=True",
        ),
        (
            lambda: lowrank_solve(
                1.0, [g], [[1.0]], torch.tensor([1.0, float("inf"), 0.0], dtype=F64)
            ),
            ValueError,
            "lowrank_solve: U or g contains non-finite values",
        ),
        (
            lambda: lowrank_solve(1.0, [g, torch.ones(2, dtype=F64)], torch.eye(2), g),
            ValueError,
            "lowrank_solve: U[1][0] has shape (2,), expected (3,)",
        ),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind) as exc:
            call()
        assert str(exc.value) == message


def test_lowrank_solve_symmetry_tolerance_is_relative_to_the_largest_entry():
    g = torch.ones(2, dtype=F64)
    U = [torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)]
    # |C − Cᵀ| up to 1e-12·max(1, max|C|) is accepted ...
    lowrank_solve(1.0, U, [[1e6, 0.0], [1e-7, 1e6]], g)
    # ... and not beyond, entries below 1 using the absolute 1e-12
    with pytest.raises(ValueError, match="symmetric"):
        lowrank_solve(1.0, U, [[0.5, 0.0], [1.5e-12, 0.5]], g)


# ---------------------------------------------------------------- shifted_lowrank_solve


def _woodbury_case(seed=50):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 2)]
    g = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    U = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(2)]
    C = torch.tensor([[0.5, 0.2], [0.2, -0.1]], dtype=F64)
    return g, U, C


def _flat(xs):
    return torch.cat([t.reshape(-1) for t in xs])


def _dense_shifted(g, U, C, diag):
    Ud = torch.stack([_flat(u) for u in U], dim=1)
    return torch.linalg.solve(torch.diag(diag) + Ud @ C @ Ud.T, _flat(g))


@pytest.mark.parametrize("kind", ["shared", "separate", "diagonal", "mixed"])
def test_shifted_lowrank_solve_equals_the_dense_solve(kind):
    g, U, C = _woodbury_case()
    c = torch.tensor(0.8, dtype=F64)
    if kind == "shared":
        shift = [c, c]
    elif kind == "separate":  # different 0-d shifts per tensor
        shift = [c, torch.tensor(1.7, dtype=F64)]
    elif kind == "diagonal":
        shift = [
            torch.tensor([0.5, 1.0, 2.0], dtype=F64),
            torch.tensor([[0.7, 0.9], [1.1, 3.0]], dtype=F64),
        ]
    else:
        shift = [c, torch.tensor([[0.7, 0.9], [1.1, 3.0]], dtype=F64)]
    diag = torch.cat([s.expand(t.shape).reshape(-1) for s, t in zip(shift, g)])
    y, finite = shifted_lowrank_solve(g, U, C, shift)
    assert [t.shape for t in y] == [t.shape for t in g]
    assert bool(finite) is True
    assert _rel(_flat(y), _dense_shifted(g, U, C, diag)) < 1e-13


def test_shifted_lowrank_solve_single_tensor_diagonal_shift():
    g = [torch.tensor([1.0, 2.0, 3.0], dtype=F64)]
    U = [[torch.tensor([1.0, 0.0, 1.0], dtype=F64)]]
    C = torch.tensor([[2.0]], dtype=F64)
    diag = torch.tensor([0.5, 1.0, 4.0], dtype=F64)
    y, finite = shifted_lowrank_solve(g, U, C, [diag])
    assert bool(finite) and _rel(y[0], _dense_shifted(g, U, C, diag)) < 1e-14


def test_shifted_lowrank_solve_shared_scalar_shift_is_plain_woodbury_without_rescaling():
    # (3I + e1 e1ᵀ) y = (4, 3): a = 1, y = (g − e1 a)/3 = (1, 1) exactly; a rescaled solve
    # (by 1/sqrt(3)) would round
    c = torch.tensor(3.0, dtype=F64)
    y, finite = shifted_lowrank_solve(
        [torch.tensor([4.0, 3.0], dtype=F64)],
        [[torch.tensor([1.0, 0.0], dtype=F64)]],
        torch.tensor([[1.0]], dtype=F64),
        [c],
    )
    assert torch.equal(y[0], torch.tensor([1.0, 1.0], dtype=F64)) and bool(finite)


@pytest.mark.parametrize("where", ["g", "U", "C"])
def test_shifted_lowrank_solve_flags_non_finite_systems(where):
    g, U, C = _woodbury_case()
    if where == "g":
        g[0][1] = float("nan")
    elif where == "U":
        U[1][1][0, 0] = float("inf")
    else:
        C = C.clone()
        C[0, 0] = float("inf")
    y, finite = shifted_lowrank_solve(g, U, C, [torch.tensor(1.0, dtype=F64)] * 2)
    assert bool(finite) is False
    assert not torch.isfinite(_flat(y)).all()


# ---------------------------------------------------------------- CG


def test_cg_stops_at_once_when_v_already_meets_rtol_and_allows_one_iteration():
    calls = []

    def hvp(x):
        calls.append(1)
        return 2 * x

    v = torch.tensor([3.0, 4.0], dtype=F64)  # ‖v‖ = 5 exactly: rtol = 1 is met by y = 0
    assert torch.equal(cg_ihvp(hvp, v, rtol=1.0), torch.zeros(2, dtype=F64)) and not calls
    # one iteration solves 2I exactly; with rtol = 0 that is no reason to warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = cg_ihvp(hvp, v, rtol=0.0, max_iters=1)
    assert torch.equal(y, v / 2) and len(calls) == 1


def test_cg_converged_run_does_not_warn():
    H = _sym(8, 60)
    v = torch.ones(8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = cg_ihvp(lambda x: H @ x, v, damping=0.5)
    assert _rel(y, torch.linalg.solve(H + 0.5 * torch.eye(8, dtype=F64), v)) < 1e-10


def test_cg_default_iteration_cap_is_min_n_1000():
    n = 1001
    diag = torch.logspace(-12, 0, n, dtype=F64)
    calls = []

    def hvp(x):
        calls.append(1)
        return diag * x

    with pytest.warns(RuntimeWarning, match="after 1000 iterations"):
        cg_ihvp(hvp, torch.ones(n, dtype=F64), rtol=0.0)
    assert len(calls) == 1000


def test_cg_not_converged_warning_reports_the_true_relative_residual():
    H = _sym(6, 61, [1e-3, 0.01, 0.1, 1.0, 10.0, 100.0])
    v = torch.ones(6, dtype=F64) * 3
    with pytest.warns(RuntimeWarning) as record:
        y = cg_ihvp(lambda x: H @ x, v, damping=0.25, max_iters=2, rtol=1e-6)
    res = float((v - (H + 0.25 * torch.eye(6, dtype=F64)) @ y).norm() / v.norm())
    assert str(record[0].message) == (
        f"cg_ihvp: not converged after 2 iterations (relative residual {res:.2e} > rtol 1.0e-06): "
        "raise max_iters, loosen rtol, or add damping (λ = 0.25); CG needs many iterations when "
        "H + λI is ill-conditioned or singular."
    )
    _assert_attributed_to_caller(record[0])


def test_cg_error_messages():
    with pytest.raises(ValueError) as exc:
        cg_ihvp(lambda x: x, torch.ones(2, dtype=F64), max_iters=0)
    assert str(exc.value) == "cg_ihvp: max_iters must be >= 1, got 0"
    with pytest.raises(ValueError) as exc:
        cg_ihvp(lambda x: x, torch.tensor([1.0, float("nan")], dtype=F64))
    assert str(exc.value) == "cg_ihvp: v contains non-finite values"
    # pᵀHp = −18, pᵀp = 9: curvature −2
    with pytest.raises(NotPositiveDefiniteError) as exc:
        cg_ihvp(
            lambda x: torch.tensor([-2.0, 1.0], dtype=F64) * x, torch.tensor([3.0, 0.0], dtype=F64)
        )
    assert str(exc.value) == (
        "cg_ihvp: H + λI (λ = 0) is not positive definite: at iteration 0 a direction has "
        "curvature pᵀ(H + λI)p / pᵀp = -2 ≤ 0. Increase the damping."
    )
    # exactly zero curvature is refused too (not divided by)
    with pytest.raises(NotPositiveDefiniteError, match=re.escape("= 0 ≤ 0")):
        cg_ihvp(lambda x: 0 * x, torch.ones(2, dtype=F64))


# ---------------------------------------------------------------- Neumann series


def _scalar_hvp(a):
    return lambda x: a * x


def test_neumann_series_zero_terms_is_v_over_s():
    v = torch.tensor([2.0, -1.0], dtype=F64)
    res = neumann_series(_scalar_hvp(3.0), v, 0, 4.0)
    assert torch.equal(res.solution, v / 4)
    assert res.moments.shape == (0,) and res.moments.dtype == F64
    assert res.a_moments.shape == (0,) and res.a_moments.dtype == F64
    assert not bool(res.diverged)
    # s = 0 is refused even without any HVP to expose it
    assert bool(neumann_series(_scalar_hvp(3.0), v, 0, 0.0).diverged)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_neumann_series_rejects_bad_num_terms(bad):
    with pytest.raises(ValueError) as exc:
        neumann_series(_scalar_hvp(1.0), torch.ones(2, dtype=F64), bad, 2.0)
    assert str(exc.value) == f"neumann_series: num_terms must be an integer >= 0, got {bad}"


def test_neumann_series_moments_and_rayleigh_quotients_match_dense_krylov():
    H = torch.diag(torch.tensor([0.5, 1.0, 3.0], dtype=F64))
    v = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    s, K = 4.0, 3
    res = neumann_series(lambda x: H.float() @ x, v.float(), K, s)  # float32 in, float64 moments
    assert res.moments.dtype == F64 and res.a_moments.dtype == F64
    A = H / s
    d = [v]
    for _ in range(K):
        d.append(d[-1] - A @ d[-1])
    m = torch.stack([x for k in range(K) for x in (d[k] @ d[k], d[k] @ d[k + 1])])
    am = torch.stack([x for k in range(K) for x in (d[k] @ A @ d[k], d[k + 1] @ A @ d[k])])
    torch.testing.assert_close(res.moments, m, rtol=1e-6, atol=0)
    torch.testing.assert_close(res.a_moments, am, rtol=1e-6, atol=0)
    q = torch.stack([d[k] @ A @ d[k] / (d[k] @ d[k]) for k in range(K)])
    torch.testing.assert_close(res.rayleigh_quotients, q, rtol=1e-6, atol=0)
    # Ritz values: Rayleigh–Ritz of A on span{d_0..d_{K−1}} (= all of R³ here)
    torch.testing.assert_close(
        neumann_ritz_values(res), torch.linalg.eigvalsh(A), rtol=0, atol=1e-5
    )


def test_neumann_series_damping_defaults_to_zero():
    v = torch.tensor([1.0, 1.0], dtype=F64)
    res = neumann_series(_scalar_hvp(1.0), v, 2, 2.0)
    # (1/2) Σ_{j=0..2} (1/2)^j = 0.875
    assert torch.equal(res.solution, 0.875 * v)


def test_neumann_series_flags_a_quotient_above_max_quotient_without_growth():
    v = torch.tensor([1.0], dtype=F64)
    res = neumann_series(_scalar_hvp(1.5), v, 3, 1.0)  # |1 − 1.5| < 1: terms shrink
    assert bool(res.diverged)  # but s = 1 < λ = 1.5 (default max_quotient = 1)
    # max_quotient = 2 tolerates it; alternating increments are no growth
    res = neumann_series(_scalar_hvp(1.9), v, 4, 1.0, max_quotient=2.0)
    assert not bool(res.diverged)
    assert float(res.solution) == pytest.approx(sum((-0.9) ** j for j in range(5)), rel=1e-14)


def test_neumann_series_max_quotient_tolerance_is_16_eps():
    eps = torch.finfo(F64).eps
    v = torch.tensor([1.0], dtype=F64)
    # Rayleigh quotient exactly 1.5: flagged iff 1.5 > max_quotient + 16 eps
    assert not bool(
        neumann_series(_scalar_hvp(1.5), v, 1, 1.0, max_quotient=1.5 - 16 * eps).diverged
    )
    assert bool(neumann_series(_scalar_hvp(1.5), v, 1, 1.0, max_quotient=1.5 - 17 * eps).diverged)


def test_neumann_series_growth_tolerance_is_16_eps():
    eps = torch.finfo(F64).eps
    v = torch.tensor([1.0], dtype=F64)
    # d1 = −(1 + 8 eps): ‖d1‖² = 1 + 16 eps = ‖d0‖² (1 + 16 eps) is not growth
    res = neumann_series(_scalar_hvp(2 + 8 * eps), v, 1, 1.0, max_quotient=3.0)
    assert float(res.moments[0]) == 1.0 and not bool(res.diverged)
    res = neumann_series(_scalar_hvp(2 + 16 * eps), v, 1, 1.0, max_quotient=3.0)
    assert bool(res.diverged)


def test_neumann_series_flags_growth_after_shrinking():
    # first HVP shrinks the increment (‖d1‖² = 1/16), the second (a rotation with a positive
    # quadratic form, Rayleigh quotient 1) triples it: growth against the previous increment
    calls = []
    rot = torch.tensor([[1.0, -3.0], [3.0, 1.0]], dtype=F64)

    def hvp(x):
        calls.append(1)
        return 0.75 * x if len(calls) == 1 else rot @ x

    res = neumann_series(hvp, torch.tensor([1.0, 0.0], dtype=F64), 2, 1.0)
    assert bool(res.diverged)


def test_neumann_series_zero_curvature_and_exact_termination():
    v = torch.tensor([1.0, 0.0], dtype=F64)
    H = torch.diag(torch.tensor([0.0, 1.0], dtype=F64))
    assert bool(neumann_series(lambda x: H @ x, v, 2, 2.0).diverged)  # vᵀHv = 0: not PD
    # v an eigenvector with A v = v: the increments vanish exactly, which is no divergence
    res = neumann_series(_scalar_hvp(2.0), v, 3, 2.0)
    assert not bool(res.diverged) and torch.equal(res.solution, v / 2)


def test_neumann_series_scale_must_be_positive_and_finite():
    v = torch.tensor([1.0], dtype=F64)
    # H = −1, s = −1: A = 1 exactly, the series terminates; only the sign of s is wrong
    assert bool(neumann_series(_scalar_hvp(-1.0), v, 2, -1.0).diverged)
    res = neumann_series(_scalar_hvp(0.25), v, 3, 0.5)  # s < 1 is fine
    assert not bool(res.diverged)


# ---------------------------------------------------------------- Ritz values


def _res(moments, a_moments):
    return NeumannResult(
        None,
        torch.tensor(False),
        torch.tensor(moments, dtype=F64),
        torch.tensor(a_moments, dtype=F64),
    )


def test_neumann_ritz_values_of_zero_and_one_terms():
    assert neumann_ritz_values(_res([], [])).shape == (0,)
    # one increment: the Ritz value is its Rayleigh quotient
    res = neumann_series(_scalar_hvp(3.0), torch.tensor([1.0, 2.0], dtype=F64), 1, 4.0)
    torch.testing.assert_close(
        neumann_ritz_values(res), torch.tensor([0.75], dtype=F64), rtol=0, atol=1e-15
    )


def test_neumann_ritz_values_drop_gram_directions_at_or_below_rel_tol():
    # v an eigenvector (A v = v/2): the scaled Gram matrix [[1, 1], [1, 1]] has the exact
    # eigenvalues {0, 2}; the zero direction is dropped even at rel_tol = 0
    res = neumann_series(_scalar_hvp(1.0), torch.tensor([1.0], dtype=F64), 2, 2.0)
    torch.testing.assert_close(
        neumann_ritz_values(res, rel_tol=0.0), torch.tensor([0.5], dtype=F64), rtol=0, atol=1e-15
    )
    # two eigen-directions: the scaled Gram eigenvalues w; rel_tol relative to max(w)
    H = torch.diag(torch.tensor([1.0, 3.0], dtype=F64))
    res = neumann_series(lambda x: H @ x, torch.tensor([1.0, 0.3], dtype=F64), 2, 4.0)
    G = res.moments[torch.tensor([[0, 1], [1, 2]])]
    dscale = G.diagonal().rsqrt()
    w = torch.linalg.eigvalsh(G * dscale[:, None] * dscale[None, :])
    between = float(w[0] / w[1]) * 1.5  # w[0] < between·w[1], w[0] > between / w[1]
    assert float(w[0]) > between / float(w[1])
    assert neumann_ritz_values(res, rel_tol=between).shape == (1,)
    torch.testing.assert_close(
        neumann_ritz_values(res, rel_tol=float(w[0] / w[1]) / 1.5),
        torch.tensor([0.25, 0.75], dtype=F64),
        rtol=0,
        atol=1e-12,
    )


# ---------------------------------------------------------------- neumann_ihvp


def _diverges(call):
    with pytest.raises(NeumannDivergenceError) as exc:
        call()
    return str(exc.value)


def test_neumann_ihvp_divergence_messages():
    v = torch.tensor([1.0, 1.0], dtype=F64)
    H = torch.diag(torch.tensor([1.0, 3.0], dtype=F64))
    pre = "neumann_ihvp: the Neumann series diverges: "
    assert _diverges(lambda: neumann_ihvp(lambda x: H @ x, v, 3, float("inf"))) == (
        pre + "scale must be a positive finite number, got inf"
    )
    assert _diverges(lambda: neumann_ihvp(lambda x: H @ x, v, 3, 0.0)) == (
        pre + "scale must be a positive finite number, got 0.0"
    )
    assert _diverges(lambda: neumann_ihvp(lambda x: x * float("nan"), v, 3, 4.0)) == (
        pre + "the HVP produced non-finite values"
    )
    # vᵀ(H + λI)v / vᵀv = (−1 + 0.2)/2 = −0.4 (reported in H's units, s = 0.5 < 1)
    Hi = torch.diag(torch.tensor([-1.0, 0.2], dtype=F64))
    assert _diverges(lambda: neumann_ihvp(lambda x: Hi @ x, v, 1, 0.5)) == (
        pre + "H + λI (λ = 0) is not positive definite: a Krylov vector has Rayleigh quotient "
        "-0.4 ≤ 0. Increase the damping."
    )
    # a zero quotient is not positive definite either
    H0 = torch.diag(torch.tensor([0.0, 1.0], dtype=F64))
    assert "Rayleigh quotient 0 ≤ 0" in _diverges(
        lambda: neumann_ihvp(lambda x: H0 @ x, torch.tensor([1.0, 0.0], dtype=F64), 2, 2.0, 0.0)
    )
    # s = 2 < λ_max = 3: the Ritz values (exact on R², 0.5 and 1.5) beat every Rayleigh quotient
    assert _diverges(lambda: neumann_ihvp(lambda x: H @ x, v, 2, 2.0)) == (
        pre + "scale 2 is below λ_max(H + λI) ≥ 3; pass a larger scale (or scale=None to "
        "estimate it by power iteration)."
    )


def test_neumann_ihvp_scale_equal_to_lambda_max_converges():
    # A's top eigenvalue is exactly 1: the Ritz test must not fire
    H = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    y = neumann_ihvp(lambda x: H @ x, torch.tensor([1.0, 1.0], dtype=F64), 60, 2.0)
    torch.testing.assert_close(y, torch.tensor([1.0, 0.5], dtype=F64), rtol=0, atol=1e-15)


def test_neumann_ihvp_zero_and_one_terms():
    v = torch.tensor([1.0, 2.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(neumann_ihvp(_scalar_hvp(1.0), v, 0, 4.0), v / 4)
    with pytest.warns(RuntimeWarning, match="num_terms=1"):
        neumann_ihvp(_scalar_hvp(1.0), v, 1, 4.0)


def test_neumann_ihvp_exact_termination_does_not_warn():
    v = torch.tensor([1.0, 0.0], dtype=F64)  # A v = v: d_1 = 0 exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = neumann_ihvp(_scalar_hvp(2.0), v, 3, 2.0)
    assert torch.equal(y, v / 2)


def test_neumann_ihvp_truncation_warning_numbers():
    # A = diag(0.5, 0.9), v = (1, 1), K = 5: the last increment d_4 = ((0.5)^4, (0.1)^4)
    H = torch.diag(torch.tensor([0.5, 0.9], dtype=F64))
    v = torch.ones(2, dtype=F64)
    K, s = 5, 1.0
    with pytest.warns(RuntimeWarning) as record:
        y = neumann_ihvp(lambda x: H @ x, v, K, s)
    d = torch.tensor([0.5**4, 0.1**4], dtype=F64)
    q = float(d @ H @ d / (d @ d))
    estimate = float(d.norm()) * (1 - q) / q / (float(y.norm()) * s)
    more = math.ceil(math.log(1e-3 / estimate) / math.log1p(-q))
    assert str(record[0].message) == (
        f"neumann_ihvp: the series has not converged after num_terms=5: estimated relative error "
        f"≈ {estimate:.2g} > rtol 1.0e-03. The error shrinks by a factor 1 − λ_min/s ≈ "
        f"{1 - q:.4g} per term, so about {more} more terms are needed: raise num_terms, bring "
        f"scale (s = 1) down towards λ_max(H + λI) (scale=None estimates it), add damping, or "
        "use cg_ihvp."
    )
    _assert_attributed_to_caller(record[0])
    # below the default rtol 1e-3 but above 1e-4: warns only with the smaller rtol
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neumann_ihvp(lambda x: H @ x, v, 12, s)
    with pytest.warns(RuntimeWarning):
        neumann_ihvp(lambda x: H @ x, v, 12, s, rtol=1e-4)


def test_neumann_ihvp_scale_estimate_is_deterministic_and_budgeted():
    H = torch.diag(torch.tensor([1.0, 0.999, 0.5, 0.4], dtype=F64))
    v = torch.ones(4, dtype=F64)
    calls = []

    def hvp(x):
        calls.append(1)
        return H @ x

    state = torch.random.get_rng_state()
    y1 = neumann_ihvp(hvp, v, 200, power_iters=5)
    assert len(calls) == 205  # the power iteration stops at its budget
    assert torch.equal(torch.random.get_rng_state(), state)  # starts from v, no random draw
    calls.clear()
    y2 = neumann_ihvp(hvp, v, 200)
    assert len(calls) == 300  # default budget: 100 HVPs
    assert torch.equal(neumann_ihvp(hvp, v, 200), y2) and not torch.equal(y1, y2)


def test_neumann_ihvp_scale_estimate_stops_at_a_loose_tolerance():
    # residual of the power iteration shrinks by 0.5 per step: 1e-4 within 16 steps, not 1e-6
    H = torch.diag(torch.tensor([1.0, 0.5, 0.25], dtype=F64))
    calls = []

    def hvp(x):
        calls.append(1)
        return H @ x

    neumann_ihvp(hvp, torch.ones(3, dtype=F64), 10, warn=False)
    assert 10 + 10 <= len(calls) <= 10 + 16


def test_neumann_ihvp_rejects_an_empty_vector():
    with pytest.raises(ValueError) as exc:
        neumann_ihvp(lambda x: x, [], 3, 1.0)
    assert str(exc.value) == "the vector is empty (no tensors)"


# ---------------------------------------------------------------- divergence reasons


def test_divergence_message_reasons_from_moments():
    from torch_rankone.linalg import _divergence_message

    empty = torch.zeros(0, dtype=F64)
    # a-moments non-finite while the moments are finite
    assert _divergence_message(_res([1.0, 0.5], [float("inf"), 0.2]), empty, 1.0, 0.0) == (
        "the HVP produced non-finite values"
    )
    # Ritz value exactly 1 and quotients below 1: growth is the reason
    assert _divergence_message(
        _res([1.0, 0.5], [0.5, 0.2]), torch.tensor([1.0], dtype=F64), 1.0, 0.0
    ) == ("the series terms grow: scale ≤ λ_max/2 or H + λI is not positive definite.")
    # a Ritz value above 1 reports max(Ritz, quotients)·s
    assert "≥ 6;" in _divergence_message(
        _res([1.0, 0.5], [1.2, 0.2]), torch.tensor([1.5], dtype=F64), 4.0, 0.0
    )


# ---------------------------------------------------------------- LiSSA


def test_lissa_divergence_reasons_without_ritz_values():
    v = torch.tensor([1.0], dtype=F64)
    pre = "lissa_ihvp (repeat 0): the Neumann series diverges: "
    assert _diverges(lambda: lissa_ihvp(_scalar_hvp(1.5), v, depth=3, scale=1.0)) == (
        pre + "scale 1 is below λ_max(H + λI) ≥ 1.5; pass a larger scale (or scale=None to "
        "estimate it by power iteration)."
    )
    rot = torch.tensor([[1.0, -3.0], [3.0, 1.0]], dtype=F64)  # Rayleigh quotient 1, growth
    assert _diverges(
        lambda: lissa_ihvp(
            lambda x: rot @ x, torch.tensor([1.0, 0.0], dtype=F64), depth=2, scale=1.0
        )
    ) == (pre + "the series terms grow: scale ≤ λ_max/2 or H + λI is not positive definite.")


def test_lissa_vanished_increment_does_not_spoil_the_message():
    # stochastic HVPs: 1.5 (quotient above 1), then exactly the identity (the increment vanishes)
    calls = []

    def hvp(x):
        calls.append(1)
        return 1.5 * x if len(calls) == 1 else x

    assert "≥ 1.5;" in _diverges(
        lambda: lissa_ihvp(hvp, torch.tensor([1.0], dtype=F64), depth=4, scale=1.0)
    )


def test_lissa_averages_repeats_and_needs_no_unit_vector():
    # ‖v‖ = 2: the moments (4, ...) are no Ritz values, LiSSA applies no Ritz test
    v = torch.tensor([2.0, 0.0], dtype=F64)
    H = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    y = lissa_ihvp(lambda x: H @ x, v, depth=60, scale=2.0, repeats=3)
    torch.testing.assert_close(y, torch.tensor([2.0, 0.0], dtype=F64), rtol=0, atol=1e-15)


# ---------------------------------------------------------- devices (the meta device: no data)


def test_on_device_makes_a_0d_tensor_of_the_dtype_on_the_device():
    from torch_rankone.linalg import _on_device

    meta = torch.device("meta")
    for x in (2.0, torch.tensor(2.0, dtype=F64)):
        t = _on_device(x, torch.float32, meta)
        assert t.shape == () and t.dtype == torch.float32 and t.device == meta
    t = _on_device(torch.tensor(2.0, dtype=F64), torch.float32, torch.device("cpu"))
    assert t.dtype == torch.float32 and float(t) == 2.0


def test_neumann_series_and_incremental_inverse_stay_on_the_inputs_device():
    v = torch.ones(3, device="meta")
    for K in (0, 2):
        res = neumann_series(_scalar_hvp(2.0), v, K, 4.0)
        assert res.solution.device.type == "meta" and res.moments.device.type == "meta"
        assert res.diverged.device.type == "meta" and res.moments.shape == (2 * K,)
    assert IncrementalInverse(3, 1.0, device="meta").inverse.device.type == "meta"


def test_neumann_ihvp_warns_only_when_the_estimate_exceeds_rtol_strictly():
    # 1-D, A = 1/2: the estimate ‖d‖(1 − q)/q / (‖y‖ s) from the series' own moments
    v, K, s = torch.tensor([1.0], dtype=F64), 6, 2.0
    res = neumann_series(_scalar_hvp(1.0), v, K, s)
    q = float(res.rayleigh_quotients[-1])
    estimate = math.sqrt(float(res.moments[-2])) * (1 - q) / q / (abs(float(res.solution)) * s)
    assert q == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neumann_ihvp(_scalar_hvp(1.0), v, K, s, rtol=estimate)
    with pytest.warns(RuntimeWarning):
        neumann_ihvp(_scalar_hvp(1.0), v, K, s, rtol=math.nextafter(estimate, 0.0))


def test_lissa_depth_repeats_damping_and_validation():
    H = torch.diag(torch.tensor([1.0, 3.0], dtype=F64))
    v = torch.tensor([1.0, 1.0], dtype=F64)
    calls = []

    def hvp(x):
        calls.append(1)
        return H @ x

    y = lissa_ihvp(hvp, v, depth=1, scale=4.0, damping=1.0)  # depth 1 is allowed
    assert len(calls) == 1  # one repeat by default
    # (1/s)(v + (I − (H + I)/s) v) = (1/4)(1 + 1/2, 1 + 0) with s = 4
    torch.testing.assert_close(y, torch.tensor([0.375, 0.25], dtype=F64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError) as exc:
        lissa_ihvp(hvp, v, depth=0, scale=4.0)
    assert str(exc.value) == "lissa_ihvp: depth and repeats must be >= 1, got 0, 1"
    with pytest.raises(ValueError, match=re.escape("got 3, 0")):
        lissa_ihvp(hvp, v, depth=3, scale=4.0, repeats=0)
    # damping enters the divergence message
    Hi = torch.diag(torch.tensor([-2.0, 3.0], dtype=F64))
    assert "H + λI (λ = 0.5) is not positive definite" in _diverges(
        lambda: lissa_ihvp(lambda x: Hi @ x, v, depth=2, scale=4.0, damping=0.5)
    )


def test_lowrank_solve_dense_path_keeps_float32():
    # N = 2 ≤ k = 2: formed and solved in float64, returned in the input dtype
    g = torch.tensor([1.0, 2.0])
    U = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    y = lowrank_solve(0.5, U, [[1.0, 0.0], [0.0, 1.0]], g)
    assert y.dtype == torch.float32
    expected = _dense_lowrank(0.5, U, [[1.0, 0.0], [0.0, 1.0]], g)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=0)
