"""One machine, one L2-regularised logistic regression: NewtonLearn's ``fit`` against
scikit-learn's solvers on the same objective, side by side in one run.

    python -m benchmarks.glm_one_machine            # a9a and w8a, all rows, λ = 1e-3, 1e-4

Objective ``P(x) = (1/N) Σ log(1 + exp(−b_j a_jᵀx)) + (λ/2)‖x‖²``; scikit-learn's
``LogisticRegression(C=1/(λN), fit_intercept=False, penalty="l2")`` minimises ``P/λ`` (the same
minimiser). ``P*``: 30 float64 exact Newton iterations. Every solver is asked for a gap
``P(x) − P* ≤ 1e-10`` (ours: ``fit(tol=1e-11)`` on the gap estimate; scikit-learn: ``tol=1e-12``,
``max_iter=10000``); the reported gap is measured afterwards. Every solver gets the data as CSR
(LIBSVM data are sparse; scikit-learn's solvers are fastest on it too). Times: the best of
``--repeats`` runs, construction included, float64, this process's threads. Writes
``docs/results/glm_one_machine.md`` (``--out``). Needs scikit-learn (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from torch_rankone import NewtonLearn
from torch_rankone.data import libsvm
from torch_rankone.glm import glm_fit, glm_loss, glm_newton

LOGISTIC = glm_loss("logistic")


def objective(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor, lam: float) -> float:
    return float(LOGISTIC.value(A @ x, b).mean() + lam / 2 * x.dot(x))  # A: CSR


def scipy_csr(A: torch.Tensor):
    import scipy.sparse as sp

    parts = (A.values().numpy(), A.col_indices().numpy(), A.crow_indices().numpy())
    return sp.csr_matrix(parts, shape=tuple(A.shape))


def best_time(run, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def newton_learn(A, b, lam):
    x = torch.zeros(A.shape[1], dtype=torch.float64, requires_grad=True)
    history = NewtonLearn([x], A, b, lam=lam).fit(tol=1e-11, max_iter=200)
    return x.detach(), len(history)


def one_machine(A, b, lam):
    fit = glm_fit(A, b, lam=lam, tol=1e-11)
    return fit.x, len(fit.history)


def sklearn_solver(solver: str):
    from sklearn.linear_model import LogisticRegression

    def run(A, b, lam):
        X = A.scipy  # converted once per dataset, outside the timing
        model = LogisticRegression(
            C=1.0 / (lam * A.shape[0]),
            fit_intercept=False,
            solver=solver,
            tol=1e-12,
            max_iter=10000,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter at this tolerance
            model.fit(X, b.numpy())
        return torch.from_numpy(model.coef_[0]).double(), int(model.n_iter_[0])

    return run


SOLVERS = {
    "glm_fit (Newton, reused factor)": one_machine,
    "NewtonLearn.fit (1 node, Identity)": newton_learn,
    "scikit-learn newton-cholesky": sklearn_solver("newton-cholesky"),
    "scikit-learn lbfgs": sklearn_solver("lbfgs"),
}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["a9a", "w8a"])
    parser.add_argument("--lams", nargs="+", type=float, default=[1e-3, 1e-4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    lines = [
        "# One machine: L2-logistic regression, NewtonLearn.fit vs scikit-learn",
        "",
        f"`python -m benchmarks.glm_one_machine` — torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float64, best of {args.repeats}; gap = P(x) − P*.",
        "",
        "| dataset | N × d | λ | solver | seconds | iterations | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.datasets:
        # every solver gets its fastest input: CSR (LIBSVM data are sparse)
        A, b = libsvm(name, dtype=torch.float64, sparse=True)
        A.scipy = scipy_csr(A)
        for lam in args.lams:
            p_star = glm_newton(A, b, lam=lam, iterations=30)[1][-1]
            for solver, run in SOLVERS.items():
                seconds, (x, iters) = best_time(
                    lambda run=run, A=A, b=b, lam=lam: run(A, b, lam), args.repeats
                )
                gap = objective(A, b, x, lam) - p_star
                lines.append(
                    f"| {name} | {A.shape[0]} × {A.shape[1]} | {lam:g} | {solver} | "
                    f"{seconds:.3f} | {iters} | {gap:.1e} |"
                )
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "glm_one_machine.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
