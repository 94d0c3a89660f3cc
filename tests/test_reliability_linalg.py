"""Inverse-HVP solvers on degenerate inputs: zero right-hand sides, NaN HVPs, truncated series."""

from __future__ import annotations

import warnings

import pytest
import torch

from torch_rankone.linalg import cg_ihvp, neumann_ihvp

F64 = torch.float64


def _spd(n: int, cond: float, dtype=F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return ((Q * torch.logspace(0, -torch.log10(torch.tensor(cond)), n, dtype=F64)) @ Q.T).to(dtype)


@pytest.mark.parametrize("scale", [None, 2.0])
def test_neumann_zero_right_hand_side_returns_zeros(scale):
    H = _spd(5, 10.0)
    hvp_calls = []

    def hvp(x):
        hvp_calls.append(1)
        return H @ x

    v = torch.zeros(5, dtype=F64)
    y = neumann_ihvp(hvp, v, 20, scale)
    assert torch.equal(y, torch.zeros(5, dtype=F64))
    assert y is not v
    # list-of-tensors input: zeros with the same structure
    ys = neumann_ihvp(lambda xs: [H @ xs[0]], [torch.zeros(5, dtype=F64)], 20, scale)
    assert isinstance(ys, list) and torch.equal(ys[0], torch.zeros(5, dtype=F64))


def test_cg_nan_hvp_is_reported_as_non_finite_not_indefinite():
    v = torch.ones(4, dtype=F64)
    with pytest.raises(FloatingPointError, match="non-finite"):
        cg_ihvp(lambda x: x * float("nan"), v)
    with pytest.raises(FloatingPointError, match="non-finite"):
        cg_ihvp(lambda x: x * float("inf"), v)


def test_neumann_warns_when_the_truncated_series_has_not_converged():
    H = _spd(20, 1e3)
    v = torch.ones(20, dtype=F64)
    exact = torch.linalg.solve(H, v)
    with pytest.warns(RuntimeWarning, match="num_terms") as record:
        y = neumann_ihvp(lambda x: H @ x, v, 100, 1.05)
    error = float((y - exact).norm() / exact.norm())
    assert error > 0.1
    message = str(record[0].message)
    estimate = float(message.split("relative error ≈ ")[1].split()[0])
    assert 0.1 * error < estimate < 10 * error  # the estimate has the right order of magnitude
    # enough terms: no warning; rtol= sets the threshold, warn=False silences it
    H2 = _spd(20, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = neumann_ihvp(lambda x: H2 @ x, v, 400, 1.05)
        assert torch.allclose(y, torch.linalg.solve(H2, v), rtol=1e-10)
        neumann_ihvp(lambda x: H @ x, v, 100, 1.05, rtol=2.0)
        neumann_ihvp(lambda x: H @ x, v, 100, 1.05, warn=False)


def test_neumann_scale_estimate_does_not_warn_about_power_iteration():
    # Nearly equal top eigenvalues: power iteration stops at its budget; the scale margin and the
    # Ritz check cover the small underestimate, so that is no reason to warn.
    H = torch.diag(torch.tensor([1.0, 0.999, 0.5, 0.4], dtype=F64))
    v = torch.ones(4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = neumann_ihvp(lambda x: H @ x, v, 200, power_iters=5)
    assert torch.allclose(y, torch.linalg.solve(H, v), rtol=1e-8)


def test_cg_stops_at_its_iteration_cap_with_a_warning_naming_the_knobs():
    H = _spd(200, 1e8)
    calls = []

    def hvp(x):
        calls.append(1)
        return H @ x

    with pytest.warns(RuntimeWarning, match="max_iters.*damping"):
        cg_ihvp(hvp, torch.ones(200, dtype=F64), max_iters=25)
    assert len(calls) == 25
