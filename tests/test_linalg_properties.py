"""Property tests: over random shapes, ranks, dtypes and conditioning, every result of
``lowrank_solve`` and ``neumann_ihvp`` is correct to a tolerance set by the conditioning, or a
clear error — never a NaN and never a silently wrong vector."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_rankone._tensorlist import flatten, unflatten
from torch_rankone.linalg import (
    LinAlgError,
    NeumannDivergenceError,
    NotPositiveDefiniteError,
    SingularSystemError,
    lowrank_solve,
    neumann_ihvp,
)

F64 = torch.float64
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shape_st = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
shapes_st = st.lists(shape_st, min_size=1, max_size=4)
dtype_st = st.sampled_from([torch.float32, torch.float64])


def _rand_vec(gen, shapes, dtype, scale=1.0):
    return [scale * torch.randn(s, generator=gen, dtype=F64).to(dtype) for s in shapes]


@SETTINGS
@given(
    shapes=shapes_st,
    k=st.integers(1, 8),
    dtype=dtype_st,
    seed=st.integers(0, 2**31 - 1),
    log_c=st.floats(-4, 2),
    c_sign=st.sampled_from([1.0, 1.0, 1.0, -1.0, 0.0]),
    col_scales=st.lists(st.floats(-3, 3), min_size=8, max_size=8),
    c_eigs=st.lists(st.floats(-2, 2), min_size=8, max_size=8),
    require_pd=st.booleans(),
)
def test_lowrank_solve_correct_or_clear_error(
    shapes, k, dtype, seed, log_c, c_sign, col_scales, c_eigs, require_pd
):
    gen = torch.Generator().manual_seed(seed)
    g = _rand_vec(gen, shapes, dtype)
    U = [_rand_vec(gen, shapes, dtype, 10.0 ** col_scales[j]) for j in range(k)]
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))
    C = (Q * torch.tensor(c_eigs[:k], dtype=F64)) @ Q.T
    c = c_sign * 10.0**log_c

    # dense float64 reference on exactly the same (possibly float32) numbers
    Ud = torch.stack([flatten(u).double() for u in U], dim=1)
    n = Ud.shape[0]
    M = c * torch.eye(n, dtype=F64) + Ud @ C @ Ud.T
    eig = torch.linalg.eigvalsh(M)
    # Woodbury divides by c, so its conditioning is over the eigenvalues and c together: for
    # N ≤ k, c is no eigenvalue and may be the largest (|λ| ≪ |c|: a = (cI + C G)⁻¹ C b is then
    # as ill-conditioned as |c|/|λ|)
    smallest = min(float(eig.abs().min()), abs(c))
    largest = max(float(eig.abs().max()), abs(c))
    kappa = largest / smallest if smallest > 0 else math.inf
    eps = torch.finfo(dtype).eps
    try:
        y = lowrank_solve(c, U, C, g, require_pd=require_pd)
    except NotPositiveDefiniteError:
        assert require_pd and float(eig.min()) <= 1e-6 * float(eig.abs().max())
        return
    except SingularSystemError:
        # only when the dtype cannot resolve the system (no spurious errors; 10x margin for the
        # error of the k×k spectral estimate)
        assert kappa > 1 / (1000 * eps), kappa
        return
    assert not require_pd or float(eig.min()) > 0
    yd = flatten(y).double()
    assert torch.isfinite(yd).all()
    assert kappa < 1 / (10 * eps)  # a result is only returned when the system is resolvable
    expected = torch.linalg.solve(M, flatten(g).double())
    err = float((yd - expected).norm() / expected.norm())
    assert err <= 50 * kappa * eps * math.sqrt(n), (err, kappa)


@SETTINGS
@given(
    shapes=shapes_st,
    dtype=dtype_st,
    seed=st.integers(0, 2**31 - 1),
    log_cond=st.floats(0, 3),
    negative=st.booleans(),
    scale_factor=st.floats(0.3, 3.0),
    num_terms=st.integers(1, 30),
    damping=st.floats(0, 1),
)
def test_neumann_ihvp_correct_or_clear_error(
    shapes, dtype, seed, log_cond, negative, scale_factor, num_terms, damping
):
    gen = torch.Generator().manual_seed(seed)
    like = _rand_vec(gen, shapes, dtype)
    n = sum(t.numel() for t in like)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.logspace(0, log_cond, n, dtype=F64)
    if negative:
        eig[0] = -2.0 - damping  # H + λI is indefinite
    H = (Q * eig) @ Q.T
    Hl = H + damping * torch.eye(n, dtype=F64)
    top = float(torch.linalg.eigvalsh(Hl)[-1])
    s = scale_factor * top
    v = _rand_vec(gen, shapes, dtype)
    Hd = H.to(dtype)

    def hvp_fn(x):
        return unflatten(Hd @ flatten(x), like)

    well_posed = not negative and scale_factor >= 1.01
    A = Hl / s
    Mx = torch.eye(n, dtype=F64) - A
    terms = [flatten(v).double()]
    for _ in range(num_terms):
        terms.append(Mx @ terms[-1])
    expected = sum(terms) / s
    try:
        # compared with the truncated series itself, so truncation is no reason to warn
        y = neumann_ihvp(hvp_fn, v, num_terms, s, damping, warn=False)
    except NeumannDivergenceError as exc:
        assert not well_posed, f"false alarm on a well-posed problem: {exc}"
        assert "diverges" in str(exc)
        return
    except LinAlgError:  # pragma: no cover - any other linalg error is a bug here
        raise
    yd = flatten(y).double()
    assert torch.isfinite(yd).all()
    # a returned vector is the truncated series, whose terms never grew
    assert terms[-1].norm() <= terms[0].norm() * (1 + 1e-6)
    tol = (1e-10 if dtype == F64 else 1e-3) * (num_terms + 1)
    assert float((yd - expected).norm() / expected.norm().clamp_min(1e-300)) <= tol
    if well_posed:
        assert not negative
