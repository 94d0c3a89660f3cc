"""The one-machine GLM path: :func:`torch_rankone.glm.glm_fit` and ``NewtonLearn.fit`` reach the
optimum (``P*`` from 30 exact Newton iterations) to the requested gap, take dense or CSR input
alike, and refuse what they cannot fit; a single NewtonLearn node defaults to no compression."""

from __future__ import annotations

import warnings

import pytest
import torch

from torch_rankone import NewtonLearn
from torch_rankone.data import libsvm
from torch_rankone.distributed import Identity, RandK
from torch_rankone.glm import glm_fit, glm_loss, glm_newton

F64 = torch.float64


def _problem(rows: int = 600, d: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, d, generator=gen, dtype=F64)
    A[torch.rand(rows, d, generator=gen) < 0.7] = 0.0  # sparse, as LIBSVM data
    b = torch.where(A[:, 0] + 0.3 * torch.randn(rows, generator=gen, dtype=F64) > 0, 1.0, -1.0)
    return A, b


def _objective(A, b, x, lam):
    return float(glm_loss("logistic").value(A @ x, b).mean() + lam / 2 * x.dot(x))


@pytest.mark.parametrize("lam", [1e-3, 1e-5])
def test_glm_fit_reaches_the_requested_gap_from_dense_and_csr_input(lam):
    A, b = _problem()
    p_star = glm_newton(A, b, lam=lam, iterations=30)[1][-1]
    dense = glm_fit(A, b, lam=lam, tol=1e-12)
    csr = glm_fit(A.to_sparse_csr(), b, lam=lam, tol=1e-12)
    for fit in (dense, csr):
        assert 0 <= _objective(A, b, fit.x, lam) - p_star <= 1e-11
        assert fit.history[-1]["gap_estimate"] <= 1e-12
    assert torch.allclose(dense.x, csr.x, rtol=1e-9, atol=1e-12)
    # the factor is reused: fewer refactorizations than iterations
    assert sum(h["refactored"] for h in dense.history) < len(dense.history)


def test_glm_fit_on_a9a_reaches_1e10():
    try:
        A, b = libsvm("a9a", dtype=F64, sparse=True)
    except OSError:
        pytest.skip("a9a not available")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        p_star = glm_newton(A, b, lam=1e-3, iterations=30)[1][-1]
        fit = glm_fit(A, b, lam=1e-3, tol=1e-11)
        assert _objective(A, b, fit.x, 1e-3) - p_star <= 1e-10


def test_glm_fit_refuses_bad_labels_and_options_and_warns_at_max_iter():
    A, b = _problem()
    with pytest.raises(ValueError, match="2\\*y - 1"):
        glm_fit(A, (b + 1) / 2)
    for kwargs, match in [
        ({"tol": 0.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"refresh": 1.0}, "refresh"),
    ]:
        with pytest.raises(ValueError, match=match):
            glm_fit(A, b, **kwargs)
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        glm_fit(A, b, max_iter=2, tol=1e-15)


def test_newton_learn_fit_stops_at_the_gap_estimate_and_one_node_is_uncompressed():
    A, b = _problem()
    x = torch.zeros(A.shape[1], dtype=F64, requires_grad=True)
    opt = NewtonLearn([x], A, b, lam=1e-3)
    assert isinstance(opt.compressor, Identity)  # one node: nothing to compress
    history = opt.fit(tol=1e-12)
    p_star = glm_newton(A, b, lam=1e-3, iterations=30)[1][-1]
    assert history[-1]["gap_estimate"] <= 1e-12 and len(history) < 30
    assert _objective(A, b, x.detach(), 1e-3) - p_star <= 1e-11
    y = torch.zeros(A.shape[1], dtype=F64, requires_grad=True)
    assert isinstance(NewtonLearn([y], A, b, num_nodes=4).compressor, RandK)
    with pytest.warns(RuntimeWarning, match="max_iter=1"):
        NewtonLearn([y], A, b, num_nodes=4).fit(tol=1e-15, max_iter=1)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_one_node_identity_iterates_equal_lagged_newton(layout):
    """One node, ``Identity()``: NL1 learns ``h = h(x^k)`` exactly, so
    ``x^{k+1} = x^k − (∇²f(x^{k−1}) + λI)⁻¹∇P(x^k)`` (``∇²f(x⁰)`` at the first step) — checked
    against dense float64 algebra (the whole-shard Gram update path)."""
    A, b = _problem(rows=300, d=6)
    lam = 1e-3
    feats = A if layout == "dense" else A.to_sparse_csr()
    x = torch.zeros(6, dtype=F64, requires_grad=True)
    opt = NewtonLearn([x], feats, b, lam=lam)

    def grad_hess(z):
        t = A @ z
        s = torch.sigmoid(b * t)
        g = A.T @ (-b * torch.sigmoid(-b * t)) / len(b) + lam * z
        return g, (A.T * (s * (1 - s))) @ A / len(b)

    z = torch.zeros(6, dtype=F64)
    H = grad_hess(z)[1]
    for _ in range(4):
        g, H_next = grad_hess(z)
        z = z - torch.linalg.solve(H + lam * torch.eye(6, dtype=F64), g)
        H = H_next
        opt.step()
        assert torch.allclose(x.detach(), z, rtol=1e-12, atol=1e-14)
