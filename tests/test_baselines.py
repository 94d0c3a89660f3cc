"""Baselines of the experiments of Islamov, Qian and Richtárik (ICML 2021): each against an
independent dense float64 reference of one or two steps of its update rule, the bit counts,
and convergence on real data (a2a)."""

from __future__ import annotations

import math

import pytest
import torch
from _glm_reference import bfgs_direct_update
from torch.func import grad, hessian

from torch_rankone.distributed import Identity, NaturalCompression, RandK, RandomDithering, TopK
from torch_rankone.distributed import baselines as bl
from torch_rankone.glm import glm_newton

N_NODES, M, D, LAM = 3, 6, 5, 0.1


pytestmark = pytest.mark.usefixtures("one_thread")  # small products: one thread


@pytest.fixture
def problem():
    """A small logistic problem with sparse-ish features, float64."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(N_NODES * M, D, generator=g, dtype=torch.float64)
    A = A * (torch.rand(A.shape, generator=g, dtype=torch.float64) < 0.7)
    b = torch.where(torch.rand(N_NODES * M, generator=g) < 0.5, -1.0, 1.0).double()
    x0 = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    return A, b, x0


# --- independent reference: per-node loop, autograd derivatives ------------------------------


def local_P(A, b, i, lam=LAM):
    rows = slice(i * M, (i + 1) * M)
    return lambda x: torch.log1p(torch.exp(-b[rows] * (A[rows] @ x))).mean() + lam / 2 * x @ x


def ref_grads(A, b, x, lam=LAM):
    return torch.stack([grad(local_P(A, b, i, lam))(x) for i in range(N_NODES)])


def ref_hessians(A, b, x, lam=LAM):
    return torch.stack([hessian(local_P(A, b, i, lam))(x) for i in range(N_NODES)])


def ref_P(A, b, x, lam=LAM):
    return sum(local_P(A, b, i, lam)(x) for i in range(N_NODES)) / N_NODES


def ref_L(A, lam=LAM):
    """max_i λ_max(A_iᵀA_i/m)/4 + λ, by a dense eigensolver per node."""
    tops = [torch.linalg.eigvalsh(A[i * M : (i + 1) * M].T @ A[i * M : (i + 1) * M] / M)[-1]
            for i in range(N_NODES)]  # fmt: skip
    return 0.25 * float(max(tops)) + lam


def ref_compress(compressor, v, gen):
    """The compressors from their definitions on float64 uniform draws of ``v``'s shape (one
    independent draw per row): RandK keeps the ``r`` largest keys scaled by ``d/r``; random
    dithering rounds ``s|v|/‖v‖`` up with probability its fractional part; natural compression
    rounds ``|v|`` up to the next power of two with probability ``|v|/2^a − 1``."""
    u = torch.rand(v.shape, generator=gen, dtype=torch.float64)
    if isinstance(compressor, RandK):
        idx = u.topk(compressor.r, dim=1).indices
        keep = torch.zeros_like(v, dtype=torch.bool).scatter_(1, idx, True)
        return torch.where(keep, v * v.shape[1] / compressor.r, 0.0)
    if isinstance(compressor, RandomDithering):
        s, norm = compressor.s, v.norm(dim=1, keepdim=True)
        level = v.abs() / norm * s
        xi = level.floor() + (u < level - level.floor()).double()
        return norm * v.sign() * xi / s
    assert isinstance(compressor, NaturalCompression)
    low = 2.0 ** torch.floor(torch.log2(v.abs()))
    return v.sign() * low * (1 + (u < v.abs() / low - 1).double())


def make(cls, problem, **kw):
    A, b, x0 = problem
    x = x0.clone()
    kw.setdefault("generator", torch.Generator().manual_seed(11))
    return x, cls([x], A, b, lam=LAM, num_nodes=N_NODES, **kw)


# --- update rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_newton_matches_dense_reference_and_bills(problem, structured):
    A, b, x0 = problem
    x, opt = make(bl.DistributedNewton, problem, structured=structured)
    xr = x0.clone()
    for _ in range(2):
        P = opt.step()
        torch.testing.assert_close(P, ref_P(A, b, xr))
        xr = xr - torch.linalg.solve(ref_hessians(A, b, xr).mean(0), ref_grads(A, b, xr).mean(0))
        torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12)
    h = opt.history[-1]
    if structured:  # rows once (32·m·d per node), then m coefficients + gradient
        assert h["bits_theory"] == N_NODES * 32 * (M * D + 2 * (M + D))
        assert h["bits_authors-code"] == 32 * (M * D + 2 * (M + D))
    else:  # symmetric Hessian + gradient per node; the authors' 32(d² + d) per node
        assert h["bits_theory"] == 2 * N_NODES * 32 * (D * (D + 1) / 2 + D)
        assert h["bits_authors-code"] == 2 * 32 * (D * D + D)
    assert h["bits"] == h["bits_theory"] == float(opt.state[x]["bits_sent"])


@pytest.mark.parametrize("compressor", [RandK(2), RandomDithering(2), NaturalCompression()])
def test_dcgd_matches_reference(problem, compressor):
    A, b, x0 = problem
    x, opt = make(bl.DCGD, problem, compressor=compressor)
    omega = compressor.omega(D)
    assert opt.lr == pytest.approx(1 / (ref_L(A) * (1 + 2 * omega / N_NODES)), rel=1e-12)
    gen, xr = torch.Generator().manual_seed(11), x0.clone()
    for _ in range(2):
        opt.step()
        xr = xr - opt.lr * ref_compress(compressor, ref_grads(A, b, xr), gen).mean(0)
        torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12)
    per_node = compressor.bits(D)
    assert opt.history[-1]["bits_theory"] == pytest.approx(2 * N_NODES * per_node)
    paper = 2.8 * D + 32 if isinstance(compressor, RandomDithering) else per_node
    assert opt.history[-1]["bits_authors-code"] == pytest.approx(2 * paper)


def test_diana_matches_reference(problem):
    A, b, x0 = problem
    C = RandK(2)
    x, opt = make(bl.DIANA, problem, compressor=C)
    omega = C.omega(D)
    assert opt.alpha == pytest.approx(1 / (omega + 1))
    assert opt.lr == pytest.approx(1 / (ref_L(A) * (1 + 6 * omega / N_NODES)), rel=1e-12)
    gen, xr, h = torch.Generator().manual_seed(11), x0.clone(), torch.zeros(N_NODES, D).double()
    for _ in range(3):
        opt.step()
        delta = ref_compress(C, ref_grads(A, b, xr) - h, gen)
        g = h.mean(0) + delta.mean(0)
        h = h + opt.alpha * delta
        xr = xr - opt.lr * g
        torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12)


def test_adiana_parameters_formulas():
    L, mu, omega, n = 4.0, 1e-3, 3.0, 80
    c = bl.adiana_parameters(L, mu, omega, n)
    p = min(1.0, max(1.0, math.sqrt(n / (32 * omega)) - 1) / (2 * (1 + omega)))
    eta = min(1 / (2 * L), n / (64 * omega * (2 * p * (omega + 1) + 1) ** 2 * L))
    theta1 = min(0.25, math.sqrt(eta * mu / p))
    gamma = eta / (2 * (theta1 + eta * mu))
    assert c == pytest.approx(
        bl.ADIANAParameters(1 / (1 + omega), p, eta, theta1, 0.5, gamma, 1 - gamma * mu)
    )
    assert bl.adiana_parameters(L, mu, 0.0, n).eta == 1 / (2 * L)  # no compression


def test_adiana_matches_reference(problem):
    A, b, x0 = problem
    C = RandK(3)
    y, opt = make(bl.ADIANA, problem, compressor=C)
    c = opt.constants
    assert c == bl.adiana_parameters(ref_L(A), LAM, C.omega(D), N_NODES)
    gen = torch.Generator().manual_seed(11)
    yr, zr, wr, h = x0.clone(), x0.clone(), x0.clone(), torch.zeros(N_NODES, D).double()
    for _ in range(3):
        P = opt.step()
        torch.testing.assert_close(P, ref_P(A, b, yr))
        xr = c.theta1 * zr + c.theta2 * wr + (1 - c.theta1 - c.theta2) * yr
        gx = ref_compress(C, ref_grads(A, b, xr) - h, gen)
        gw = ref_compress(C, ref_grads(A, b, wr) - h, gen)
        g = h.mean(0) + gx.mean(0)
        h = h + c.alpha * gw
        y_new = xr - c.eta * g
        zr = c.beta * zr + (1 - c.beta) * xr + c.gamma / c.eta * (y_new - xr)
        if torch.rand((), generator=gen, dtype=torch.float64) < c.p:
            wr = yr
        yr = y_new
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert opt.history[-1]["bits_theory"] == pytest.approx(3 * 2 * N_NODES * C.bits(D))


def test_bfgs_matches_direct_bfgs_reference(problem):
    A, b, x0 = problem
    x, opt = make(bl.BFGS, problem)
    # reference: the direct (Hessian, not inverse) BFGS update and a linear solve
    B = ref_hessians(A, b, x0).mean(0)
    xr, g_old, x_old = x0.clone(), None, None
    for _ in range(4):
        opt.step()
        g = ref_grads(A, b, xr).mean(0)
        if g_old is not None:
            B = bfgs_direct_update(B, xr - x_old, g - g_old)
        x_old, g_old = xr, g
        xr = xr - torch.linalg.solve(B, g)
        torch.testing.assert_close(x, xr, rtol=1e-10, atol=1e-12)
    assert opt.history[0]["bits_theory"] == N_NODES * 32 * (D * (D + 1) / 2 + D)
    assert opt.history[0]["bits_authors-code"] == 32 * (D * (D + 1) / 2 + D)


def ref_dingo_step(A, b, x, theta, phi, rho):
    """One DINGO iteration (Crane & Roosta 2019, Algorithm 1) with explicit inverses."""
    g = ref_grads(A, b, x).mean(0)
    H = ref_hessians(A, b, x)
    h = (H @ g).mean(0)
    bound = theta * g @ g
    eye = torch.eye(D, dtype=torch.float64)
    p = -torch.stack([torch.linalg.pinv(Hi) @ g for Hi in H]).mean(0)
    vectors, case = 1 + 2, 1
    if -p @ h < bound:
        Htil = [torch.cat([Hi, phi * eye]) for Hi in H]
        q = torch.stack([torch.linalg.pinv(Ht) @ torch.cat([g, torch.zeros(D).double()])
                         for Ht in Htil])  # fmt: skip
        vectors, case, p = vectors + 1, 2, -q.mean(0)
        if q.mean(0) @ h < bound:
            ps = []
            for qi, Ht in zip(q, Htil):
                lam_i = 0.0
                Kh = torch.linalg.solve(Ht.T @ Ht, h)
                if qi @ h < bound:
                    lam_i = (bound - qi @ h) / (Kh @ h)
                ps.append(-qi - lam_i * Kh)
            vectors, case, p = vectors + 1, 3, torch.stack(ps).mean(0)
    for j in range(11):
        alpha = 2.0**-j
        gn = ref_grads(A, b, x + alpha * p).mean(0)
        vectors += 1
        if gn @ gn <= g @ g + 2 * alpha * rho * p @ h:
            break
    return x + alpha * p, case, vectors


@pytest.mark.parametrize("theta,case", [(1e-4, 1), (3.0, 3)])
def test_dingo_matches_reference(problem, theta, case):
    A, b, x0 = problem
    x, opt = make(bl.DINGO, problem, theta=theta)
    xr, vectors, cases = x0.clone(), [], []
    for _ in range(2):
        opt.step()
        xr, c, v = ref_dingo_step(A, b, xr, theta, 1e-6, 1e-4)
        cases.append(c)
        vectors.append(v)
        torch.testing.assert_close(x, xr, rtol=1e-9, atol=1e-12)
    assert case in cases and opt.state[x]["cases"][case - 1] >= 1
    # the reference counts the initial gradient in every iteration; DINGO reuses the accepted
    # line-search point's gradient after the first
    uplink = 32 * D * (sum(vectors) - 1)  # one node's
    assert opt.history[-1]["bits_theory"] == N_NODES * uplink
    assert opt.history[-1]["bits_authors-text"] == N_NODES * uplink  # no downlink
    assert opt.history[-1]["bits_authors-code"] == uplink + 2 * 3 * 32 * D  # + the downlink


# --- interface and input checks ------------------------------------------------------------------


def test_history_format_and_bits_state(problem):
    x, opt = make(bl.DIANA, problem, compressor=NaturalCompression(), accounting="paper")
    assert float(opt.state[x]["bits_sent"]) == 0.0
    for _ in range(3):
        out = opt.step()
    assert out.dim() == 0
    assert set(opt.history[0]) == {
        "loss", "bits", "time", "bits_theory", "bits_authors-code", "bits_authors-text"
    }  # fmt: skip
    assert opt.history[-1]["bits"] == opt.history[-1]["bits_authors-code"] == 3 * 9 * D
    assert float(opt.state[x]["bits_sent"]) == opt.history[-1]["bits"]
    assert opt.history[-1]["time"] >= opt.history[0]["time"] > 0


def test_bad_inputs(problem):
    A, b, x0 = problem
    x = x0.clone()
    with pytest.raises(ValueError, match="not divisible"):
        bl.BFGS([x], A, b, num_nodes=4)
    with pytest.raises(ValueError, match="accounting"):
        bl.BFGS([x], A, b, num_nodes=3, accounting="bogus")
    with pytest.raises(ValueError, match="unbiased"):
        bl.DIANA([x], A, b, compressor=TopK(2), num_nodes=3)
    with pytest.raises(TypeError, match="Compressor"):
        bl.DCGD([x], A, b, compressor="randk", num_nodes=3)
    with pytest.raises(ValueError, match="rho"):
        bl.DINGO([x], A, b, rho=1.0, num_nodes=3)
    with pytest.raises(ValueError, match="lam"):
        bl.DistributedNewton([x], A, b, lam=-1.0)
    with pytest.raises(ValueError, match="features"):
        bl.DistributedNewton([torch.zeros(D + 1).double()], A, b)
    with pytest.raises(TypeError, match="dtype"):
        bl.DistributedNewton([x.float()], A, b)
    with pytest.raises(ValueError, match="lr"):
        bl.DCGD([x], A, b, compressor=Identity(), lr=0.0, num_nodes=3)
    with pytest.raises(TypeError, match="closure"):
        bl.BFGS([x], A, b, num_nodes=3).step(lambda: 0.0)


# --- convergence on real data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def a2a():
    from torch_rankone.data import libsvm

    try:
        A, b = libsvm("a2a", dtype=torch.float64)
    except FileNotFoundError as exc:
        pytest.skip(f"a2a not available: {exc}")
    return A[: 15 * 151], b[: 15 * 151]


def run_gap(cls, data, lam, iters, **kw):
    A, b = data
    p_star = glm_newton(A, b, lam=lam, iterations=25)[1][-1]
    x = torch.zeros(A.shape[1], dtype=torch.float64)
    opt = cls([x], A, b, lam=lam, num_nodes=15, generator=torch.Generator().manual_seed(0), **kw)
    gaps = [float(opt.step()) - p_star for _ in range(iters)]
    return gaps


@pytest.mark.parametrize(
    "cls,kw,iters",
    [
        (bl.DistributedNewton, {}, 8),
        (bl.DistributedNewton, {"structured": True}, 8),
        (bl.BFGS, {}, 25),
        (bl.DINGO, {}, 15),
    ],
)
def test_second_order_baselines_converge_on_a2a(a2a, cls, kw, iters):
    gaps = run_gap(cls, a2a, 1e-3, iters, **kw)
    assert gaps[0] > 0.3 and min(gaps) < 1e-10


@pytest.mark.parametrize("cls", [bl.DIANA, bl.ADIANA])
def test_variance_reduced_first_order_converge_on_a2a(a2a, cls):
    """Theoretical stepsizes; λ = 0.05 keeps the condition number (and the test) small."""
    gaps = run_gap(cls, a2a, 0.05, 1500, compressor=RandK(30))
    assert min(gaps) < 1e-8


def test_dcgd_converges_to_a_neighbourhood_only_on_a2a(a2a):
    """Uncompressed DCGD is gradient descent (converges); compressed DCGD stalls."""
    exact = run_gap(bl.DCGD, a2a, 0.05, 1500, compressor=Identity())
    noisy = run_gap(bl.DCGD, a2a, 0.05, 1500, compressor=RandK(30))
    assert min(exact) < 1e-8
    assert 1e-8 < min(noisy) < 1e-3 * noisy[0]
