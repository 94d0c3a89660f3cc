"""linalg: every solver against torch.linalg.solve / dense closed forms in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch.autograd.functional import hessian

from torch_rankone._tensorlist import flatten, unflatten
from torch_rankone.linalg import (
    IncrementalInverse,
    NeumannDivergenceError,
    NotPositiveDefiniteError,
    SingularSystemError,
    cg_ihvp,
    ihvp_inverse_gradient,
    lissa_ihvp,
    lowrank_solve,
    neumann_ihvp,
    neumann_series,
)

F64 = torch.float64
SHAPES = [(3, 4), (), (5,), (2, 1, 3)]  # 0-d included: N = 12 + 1 + 5 + 6 = 24


def _vec(gen, dtype=F64, shapes=SHAPES):
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def _spd(n, gen, cond=10.0, dtype=F64, shift=0.0):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=F64) + shift
    return (Q * eig) @ Q.T


# ------------------------------------------------------------------------------- lowrank_solve


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_lowrank_solve_equals_dense_solve(k, dtype, tol):
    gen = torch.Generator().manual_seed(k)
    g = _vec(gen, dtype)
    U = [_vec(gen, dtype) for _ in range(k)]
    C = torch.randn(k, k, generator=gen, dtype=F64)
    C = C @ C.T / k  # PSD
    c = 0.7
    y = lowrank_solve(c, U, C, g, require_pd=True)
    assert [t.shape for t in y] == [t.shape for t in g] and y[0].dtype == dtype
    Ud = torch.stack([flatten(u).double() for u in U], dim=1)
    M = c * torch.eye(Ud.shape[0], dtype=F64) + Ud @ C @ Ud.T
    expected = torch.linalg.solve(M, flatten(g).double())
    assert rel_err(flatten(y).double(), expected) < tol


def test_lowrank_solve_indefinite_but_invertible_and_single_tensor():
    gen = torch.Generator().manual_seed(0)
    n = 30
    h, u = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    g = torch.randn(n, generator=gen, dtype=F64)
    C = (n / 2) * torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)  # RankOneNewton's C
    c = 0.1
    M = c * torch.eye(n, dtype=F64) + (n / 2) * (torch.outer(h, u) + torch.outer(u, h))
    assert torch.linalg.eigvalsh(M)[0] < 0  # indefinite
    y = lowrank_solve(c, [h, u], C, g)
    assert isinstance(y, torch.Tensor)
    assert rel_err(y, torch.linalg.solve(M, g)) < 1e-10
    with pytest.raises(NotPositiveDefiniteError, match="smallest eigenvalue"):
        lowrank_solve(c, [h, u], C, g, require_pd=True)


def test_lowrank_solve_singular_systems_raise():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(10, generator=gen, dtype=F64)
    g = torch.randn(10, generator=gen, dtype=F64)
    # I − u uᵀ/‖u‖² is a projector: singular
    C = torch.tensor([[-1.0 / float(u.dot(u))]], dtype=F64)
    with pytest.raises(SingularSystemError, match="singular"):
        lowrank_solve(1.0, [u], C, g)
    with pytest.raises(SingularSystemError):
        lowrank_solve(0.0, [u], torch.eye(1, dtype=F64), g)  # c = 0 with k < N
    # nearly singular beyond float32 resolution, fine in float64
    C2 = torch.tensor([[-(1 - 1e-7) / float(u.dot(u))]], dtype=F64)
    with pytest.raises(SingularSystemError, match="float32"):
        lowrank_solve(1.0, [u.float()], C2, g.float())
    y = lowrank_solve(1.0, [u], C2, g)
    M = torch.eye(10, dtype=F64) + C2[0, 0] * torch.outer(u, u)
    assert rel_err(y, torch.linalg.solve(M, g)) < 1e-6


def test_lowrank_solve_unchecked_singular_gives_nonfinite_not_garbage():
    u = torch.ones(4, dtype=F64)
    y = lowrank_solve(0.0, [u], torch.eye(1, dtype=F64), torch.ones(4, dtype=F64), check=False)
    assert not torch.isfinite(y).all()


def test_lowrank_solve_bad_input_errors():
    g = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match="shape"):
        lowrank_solve(1.0, [[torch.zeros(3), torch.zeros(3)]], torch.eye(1), g)
    with pytest.raises(ValueError, match=r"C has shape"):
        lowrank_solve(1.0, [g], torch.eye(2), g)
    with pytest.raises(ValueError, match="symmetric"):
        lowrank_solve(1.0, [g, g], torch.tensor([[1.0, 2.0], [0.0, 1.0]]), g)
    with pytest.raises(TypeError, match="dtype"):
        lowrank_solve(1.0, [[torch.zeros(3, dtype=F64), torch.zeros(2)]], torch.eye(1), g)
    with pytest.raises(ValueError, match="finite"):
        lowrank_solve(float("nan"), [g], torch.eye(1), g)
    with pytest.raises(ValueError, match="non-finite"):
        lowrank_solve(1.0, [[torch.full((3,), float("inf")), torch.zeros(2)]], torch.eye(1), g)


# ------------------------------------------------------------------------------- Neumann


def _counting(fn):
    def wrapped(x):
        wrapped.calls += 1
        return fn(x)

    wrapped.calls = 0
    return wrapped


def test_neumann_equals_closed_form_truncated_series_exactly():
    gen = torch.Generator().manual_seed(0)
    like = _vec(gen)
    n = sum(t.numel() for t in like)
    H = _spd(n, gen, cond=30.0)
    lam, K = 0.05, 7
    s = 1.3 * float(torch.linalg.eigvalsh(H)[-1] + lam)
    v = _vec(gen)
    hvp_fn = _counting(lambda x: unflatten(H @ flatten(x), like))
    res = neumann_series(hvp_fn, v, K, s, lam)
    assert hvp_fn.calls == K  # exactly K HVPs
    M = torch.eye(n, dtype=F64) - (H + lam * torch.eye(n, dtype=F64)) / s
    expected = sum(torch.linalg.matrix_power(M, j) for j in range(K + 1)) @ flatten(v) / s
    assert rel_err(flatten(res.solution), expected) < 1e-13
    assert not bool(res.diverged)


def test_neumann_converges_to_solve_and_estimates_scale():
    gen = torch.Generator().manual_seed(1)
    n = 40
    H = _spd(n, gen, cond=20.0)
    v = torch.randn(n, generator=gen, dtype=F64)
    exact = torch.linalg.solve(H + 0.1 * torch.eye(n, dtype=F64), v)
    y = neumann_ihvp(lambda x: H @ x, v, 600, scale=None, damping=0.1)
    assert rel_err(y, exact) < 1e-10
    cg = cg_ihvp(lambda x: H @ x, v, damping=0.1)
    assert rel_err(cg, exact) < 1e-9


@pytest.mark.parametrize(
    "case", ["scale_half", "scale_0.9", "indefinite", "nan_hvp", "negative_scale"]
)
def test_neumann_divergence_is_reported_not_returned(case):
    gen = torch.Generator().manual_seed(2)
    n = 50
    H = _spd(n, gen, cond=30.0)
    top = float(torch.linalg.eigvalsh(H)[-1])
    v = torch.randn(n, generator=gen, dtype=F64)
    hvp_fn, scale, damping = (lambda x: H @ x), 1.05 * top, 0.0
    if case == "scale_half":
        scale = 0.45 * top
    elif case == "scale_0.9":
        scale = 0.9 * top  # the series still converges here: only the Ritz values reveal it
    elif case == "indefinite":
        damping = -0.5 * float(torch.linalg.eigvalsh(H)[0]) - 2.0
    elif case == "nan_hvp":
        hvp_fn = lambda x: H @ x * float("nan")  # noqa: E731
    else:
        scale = -top
    match = {
        "scale_half": "scale",
        "scale_0.9": "below λ_max",
        "indefinite": "not positive definite",
        "nan_hvp": "non-finite",
        "negative_scale": "positive",
    }[case]
    with pytest.raises(NeumannDivergenceError, match=match):
        neumann_ihvp(hvp_fn, v, 20, scale, damping)
    assert bool(neumann_series(hvp_fn, v, 20, scale, damping).diverged) or case == "scale_0.9"


def test_cg_and_lissa_converge_on_real_logistic_regression(mushrooms_logreg):
    prob = mushrooms_logreg
    d = prob.A.shape[1]
    gen = torch.Generator().manual_seed(0)
    x = 0.05 * torch.randn(d, generator=gen, dtype=F64)
    v = torch.randn(d, generator=gen, dtype=F64)
    H = prob.hessian(x)  # includes λ = 1e-3
    exact = torch.linalg.solve(H, v)
    full_hvp = lambda u: torch.func.jvp(torch.func.grad(prob.loss), (x,), (u,))[1]  # noqa: E731

    assert rel_err(cg_ihvp(full_hvp, v, max_iters=500, rtol=1e-12), exact) < 1e-8

    # LiSSA with a deterministic HVP is the Neumann series; with mini-batches it averages
    top = float(torch.linalg.eigvalsh(H)[-1])
    y_lissa_det = lissa_ihvp(full_hvp, v, depth=30, scale=1.2 * top, repeats=1)
    y_neumann = neumann_ihvp(full_hvp, v, 30, 1.2 * top, warn=False)  # truncated on purpose
    assert rel_err(y_lissa_det, y_neumann) < 1e-12

    # Stochastic: a damped problem (λ_eff = 0.05) so that depth can be moderate.
    damp = 0.05
    exact_d = torch.linalg.solve(H + damp * torch.eye(d, dtype=F64), v)
    n = prob.A.shape[0]
    batch_gen = torch.Generator().manual_seed(5)

    def minibatch_hvp(u):
        rows = torch.randint(0, n, (2048,), generator=batch_gen)
        return torch.func.jvp(torch.func.grad(lambda z: prob.loss(z, rows)), (x,), (u,))[1]

    y = lissa_ihvp(minibatch_hvp, v, depth=400, scale=1.5 * top, damping=damp, repeats=4)
    assert rel_err(y, exact_d) < 1e-2


def test_cg_rejects_indefinite_and_warns_when_not_converged():
    gen = torch.Generator().manual_seed(3)
    H = _spd(10, gen, cond=5.0) - 3.0 * torch.eye(10, dtype=F64)
    v = torch.randn(10, generator=gen, dtype=F64)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        cg_ihvp(lambda x: H @ x, v)
    H2 = _spd(30, gen, cond=1e4)
    with pytest.warns(RuntimeWarning, match="not converged"):
        cg_ihvp(lambda x: H2 @ x, torch.randn(30, generator=gen, dtype=F64), max_iters=3)


# ----------------------------------------------- H⁻¹v from the gradient's inverse (Lee, 2019)


def _inverse_hessian_times(f, x, v):
    return torch.linalg.solve(hessian(f, x), v)


def test_inverse_gradient_sum_of_cubes():
    """f = Σ x_i³: ∇f = 3x², x = sign(x)·sqrt(z/3); the sign branch is the caller's."""
    x = torch.tensor([0.7, -1.3, 2.1, -0.4], dtype=F64)
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    f = lambda t: (t**3).sum()  # noqa: E731
    z = torch.func.grad(f)(x)
    sign = torch.sign(x)
    got = ihvp_inverse_gradient(lambda g: sign * torch.sqrt(g / 3), z, v)
    assert rel_err(got, _inverse_hessian_times(f, x, v)) < 1e-12


def test_inverse_gradient_product_of_three():
    """f = x1 x2 x3: x1 = ±sqrt(z2 z3 / z1) etc. (Lee, 2019), signs from the point."""
    x = torch.tensor([0.8, -1.5, 2.2], dtype=F64)
    v = torch.tensor([0.3, 1.0, -0.7], dtype=F64)
    f = lambda t: t.prod()  # noqa: E731
    z = torch.func.grad(f)(x)
    sign = torch.sign(x)

    def grad_inverse(g):
        g1, g2, g3 = g
        return sign * torch.stack([g2 * g3 / g1, g1 * g3 / g2, g1 * g2 / g3]).abs().sqrt()

    got = ihvp_inverse_gradient(grad_inverse, z, v)
    assert rel_err(got, _inverse_hessian_times(f, x, v)) < 1e-12
    # and the closed form: (H⁻¹v)_1 = (v2 x1 x2 + v3 x1 x3 − v1 x1²) / (2 x1 x2 x3)
    x1, x2, x3 = x
    closed = (v[1] * x1 * x2 + v[2] * x1 * x3 - v[0] * x1**2) / (2 * x1 * x2 * x3)
    assert abs(float(got[0] - closed)) < 1e-12


# ----------------------------------------------------- Sherman–Morrison incremental inverse


def test_incremental_inverse_after_100_updates():
    gen = torch.Generator().manual_seed(0)
    dim, lam = 25, 0.3
    inc = IncrementalInverse(dim, lam)
    M = lam * torch.eye(dim, dtype=F64)
    for _ in range(100):
        v = torch.randn(dim, generator=gen, dtype=F64)
        inc.update(v)
        M += torch.outer(v, v)
    assert inc.num_updates == 100
    assert rel_err(inc.inverse, torch.linalg.inv(M)) < 1e-10
    b = torch.randn(dim, generator=gen, dtype=F64)
    assert rel_err(inc.solve(b), torch.linalg.solve(M, b)) < 1e-10
    # a downdate removes the last outer product again
    inc.update(v, weight=-1.0)
    M -= torch.outer(v, v)
    assert rel_err(inc.inverse, torch.linalg.inv(M)) < 1e-9


def test_incremental_inverse_errors():
    with pytest.raises(ValueError, match="damping"):
        IncrementalInverse(3, 0.0)
    inc = IncrementalInverse(2, 1.0)
    with pytest.raises(ValueError, match="shape"):
        inc.update(torch.ones(3))
    with pytest.raises(SingularSystemError):
        inc.update(torch.tensor([1.0, 0.0]), weight=-1.0)  # λI − e1e1ᵀ is singular
    assert inc.num_updates == 0
    torch.testing.assert_close(inc.inverse, torch.eye(2, dtype=F64))  # untouched
