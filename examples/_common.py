"""Helpers shared by ``rank_one_mushrooms.py`` and ``quickstart.py``.

The problem both scripts start from is L2-regularised logistic regression,

    P(x) = (1/n) Σ_i log(1 + exp(−b_i a_iᵀx)) + (λ/2) ‖x‖²,

with its closed-form gradient and Hessian (independent of autograd, so they can check the
optimizers), the constants the slides' theory needs (smoothness ``L`` and Hessian-Lipschitz
``M``), exact Newton for the optimum ``P*``, the data loaders and the plotting set-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts and tests write PNG files; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from torch_rankone.data import find_libsvm, load_libsvm  # noqa: E402

#: sup_t |d³/dt³ log(1 + exp(−t))| = max σ(1−σ)(1−2σ) = 1/(6√3)
LOGISTIC_THIRD_DERIVATIVE_SUP = 1 / (6 * math.sqrt(3))


@dataclass(frozen=True)
class LogisticRegression:
    """``P(x) = mean_i log(1 + exp(−b_i a_iᵀx)) + (λ/2)‖x‖²`` on features ``A`` and labels ±1."""

    A: Tensor
    b: Tensor
    lam: float

    @property
    def dim(self) -> int:
        return self.A.shape[1]

    def per_sample_losses(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """``ℓ_i(x) = log(1 + exp(−b_i a_iᵀx)) + (λ/2)‖x‖²`` for the given rows (all by default).

        The regulariser is added to every sample, so the mean over all rows is ``P(x)``: this
        is the per-sample loss vector FisherNewton's closure returns.
        """
        A, b = (self.A, self.b) if rows is None else (self.A[rows], self.b[rows])
        return torch.nn.functional.softplus(-b * (A @ x)) + 0.5 * self.lam * x.dot(x)

    def value(self, x: Tensor) -> Tensor:
        return self.per_sample_losses(x).mean()

    def grad(self, x: Tensor) -> Tensor:
        """Closed form ``−Aᵀ(b ⊙ σ(−b ⊙ Ax))/n + λx``."""
        s = torch.sigmoid(-self.b * (self.A @ x))
        return -(self.A.T @ (self.b * s)) / self.A.shape[0] + self.lam * x

    def hessian(self, x: Tensor) -> Tensor:
        """Closed form ``Aᵀ diag(σ(1−σ)) A / n + λI`` (a dense ``d×d`` matrix)."""
        s = torch.sigmoid(self.A @ x)
        eye = torch.eye(self.dim, dtype=self.A.dtype)
        return (self.A.T * (s * (1 - s))) @ self.A / self.A.shape[0] + self.lam * eye

    def smoothness(self) -> float:
        """The bound ``L = λ_max(AᵀA)/(4n) + λ ≥ λ_max(∇²P(x))`` for every ``x`` (σ(1−σ) ≤ 1/4)."""
        top = torch.linalg.eigvalsh(self.A.T @ self.A)[-1]
        return float(top) / (4 * self.A.shape[0]) + self.lam

    def hessian_lipschitz(self) -> float:
        """``M = sup|φ'''| · max_i ‖a_i‖³`` with ``sup|φ'''| = 1/(6√3)``."""
        return LOGISTIC_THIRD_DERIVATIVE_SUP * float(self.A.norm(dim=1).max()) ** 3


def newton_iterates(problem: LogisticRegression, x0: Tensor, steps: int) -> list[Tensor]:
    """Exact Newton, ``x ← x − ∇²P(x)⁻¹ ∇P(x)``: the iterates ``x_0 .. x_steps``."""
    xs = [x0]
    for _ in range(steps):
        x = xs[-1]
        xs.append(x - torch.linalg.solve(problem.hessian(x), problem.grad(x)))
    return xs


def optimum(problem: LogisticRegression, iters: int = 30) -> tuple[Tensor, float]:
    """``(x*, P*)`` from ``iters`` exact Newton steps from 0 in float64 (quadratic convergence
    makes 30 ample; the gradient norm at ``x*`` is at rounding level)."""
    x0 = torch.zeros(problem.dim, dtype=torch.float64)
    x_star = newton_iterates(problem, x0, iters)[-1]
    return x_star, float(problem.value(x_star))


def load_mushrooms() -> tuple[Tensor, Tensor] | None:
    """The LIBSVM mushrooms data (8124 × 112, labels ±1, float64) from ``shared/data/libsvm``
    via :func:`torch_rankone.data.find_libsvm`, or ``None`` where that folder is absent."""
    path = find_libsvm("mushrooms")
    return None if path is None else load_libsvm(path, n_features=112)


def load_breast_cancer() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled breast-cancer data (569 × 30), standardised, labels ±1."""
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer

    X, y = sklearn_breast_cancer(return_X_y=True)
    A = torch.tensor(X, dtype=torch.float64)
    return (A - A.mean(0)) / A.std(0), torch.tensor(2.0 * y - 1)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (small: 110 dpi) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
