"""Shared fixtures: real-data problems and small models, with dense float64 references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI replays a fixed set of examples (a red CI run must be reproducible); local runs keep
# exploring new ones, and the local example database replays any failure found.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

SHARED_LIBSVM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "libsvm"


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: small per-iteration operations (sparse products,
    d×d solves) stall on a second thread of a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


def _load_mushrooms():
    from torch_rankone.data import libsvm

    try:
        return libsvm("mushrooms", dtype=torch.float64)
    except FileNotFoundError as exc:  # only when ../shared is absent
        pytest.skip(f"mushrooms data not available: {exc}")


@pytest.fixture(scope="session")
def mushrooms():
    """``(A, b)``: the real LIBSVM mushrooms data, 8124 × 112, labels ±1, float64."""
    return _load_mushrooms()


class LogReg:
    """L2-regularised logistic regression ``f(x) = mean log(1 + exp(−b aᵀx)) + λ/2 ‖x‖²``."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, lam: float) -> None:
        self.A, self.b, self.lam = A, b, lam

    def loss(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        A, b = (self.A, self.b) if rows is None else (self.A[rows], self.b[rows])
        return torch.nn.functional.softplus(-b * (A @ x)).mean() + 0.5 * self.lam * x.dot(x)

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        """Closed form ``Aᵀ diag(σ(1−σ)) A / n + λI`` (independent of autograd)."""
        s = torch.sigmoid(self.A @ x)
        w = s * (1 - s)
        n, d = self.A.shape
        return (self.A.T * w) @ self.A / n + self.lam * torch.eye(d, dtype=self.A.dtype)


@pytest.fixture(scope="session")
def mushrooms_logreg(mushrooms):
    A, b = mushrooms
    return LogReg(A, b, lam=1e-3)


def make_mlp(sizes=(5, 7, 3), seed=0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(m, n))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))
