"""The curvature and linear-algebra core on real data, checked against dense float64 answers.

L2-regularised logistic regression, ``P(x) = mean log(1 + exp(−b aᵀx)) + λ/2 ‖x‖²``, on the
LIBSVM mushrooms data (8124 × 112) from ../shared/data/libsvm when present, else on
scikit-learn's bundled breast-cancer data (569 × 30, standardised). Every row of the printed
table compares one routine of ``torch_rankone`` with an independent dense computation:
``torch.autograd.functional.hessian`` and ``torch.linalg.solve``/``eigvalsh``.

    python examples/core_demo.py
"""

from __future__ import annotations

import time

import torch
from torch.autograd.functional import hessian

from torch_rankone import curvature, linalg
from torch_rankone.data import find_libsvm, load_libsvm

LAM = 1e-3


def load_data() -> tuple[str, torch.Tensor, torch.Tensor]:
    path = find_libsvm("mushrooms")
    if path is not None:
        A, b = load_libsvm(path, n_features=112)
        return f"mushrooms ({path})", A, b
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    A = torch.tensor(X, dtype=torch.float64)
    A = (A - A.mean(0)) / A.std(0)
    return "breast-cancer (scikit-learn, ../shared not found)", A, torch.tensor(2.0 * y - 1)


def main() -> list[tuple[str, float, int, float]]:
    """Print the table; return its rows ``(routine, relative error, HVPs, seconds)``."""
    torch.manual_seed(0)
    name, A, b = load_data()
    n, d = A.shape

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-b * (A @ x)).mean() + 0.5 * LAM * x.dot(x)

    x = 0.1 * torch.randn(d, dtype=torch.float64)
    v = torch.randn(d, dtype=torch.float64)
    H = hessian(loss, x)  # dense reference
    rows: list[tuple[str, float, int, float]] = []
    hvp_count = [0]

    def record(what, reference, fn):
        fn() if "forward-over-reverse" in what else None  # exclude torch.func's first-call set-up
        hvp_count[0] = 0
        t0 = time.perf_counter()
        got = fn()
        dt = time.perf_counter() - t0
        err = float((got - reference).norm() / reference.norm())
        rows.append((what, err, hvp_count[0], dt))

    hv_ref = H @ v

    def forward_over_reverse() -> torch.Tensor:
        hvp_count[0] += 1
        return curvature.hvp(loss, x, v)

    record("hvp, forward-over-reverse", hv_ref, forward_over_reverse)
    xl = x.clone().requires_grad_()
    _, hvp_fn = curvature.graph_hvp_fn(loss(xl), [xl])

    def hv(u: torch.Tensor) -> torch.Tensor:
        hvp_count[0] += 1
        return hvp_fn([u])[0]

    record("hvp, reverse-over-reverse", hv_ref, lambda: hv(v))

    eig = torch.linalg.eigvalsh(H)
    record(
        "lambda_max (power iteration)",
        eig[-1:],
        lambda: curvature.lambda_max(lambda u: [hv(u[0])], [x], max_iters=2000, tol=1e-9)[None],
    )

    solve_ref = torch.linalg.solve(H, v)
    s = 1.05 * float(eig[-1])
    for K in (10, 100, 1000):
        record(
            f"neumann_ihvp, K={K}",
            solve_ref,
            lambda K=K: linalg.neumann_ihvp(hv, v, K, s, warn=False),
        )
    record("cg_ihvp", solve_ref, lambda: linalg.cg_ihvp(hv, v, rtol=1e-12, max_iters=1000))

    def lissa():
        gen = torch.Generator().manual_seed(0)

        def batch_hv(u):
            hvp_count[0] += 1
            idx = torch.randint(0, n, (min(n, 1024),), generator=gen)
            f = lambda z: torch.nn.functional.softplus(-b[idx] * (A[idx] @ z)).mean()  # noqa: E731
            return torch.func.jvp(torch.func.grad(f), (x,), (u,))[1] + LAM * u

        return linalg.lissa_ihvp(batch_hv, v, depth=1000, scale=1.5 * s, repeats=2)

    record("lissa_ihvp, depth 1000 x 2 (batch 1024)", solve_ref, lissa)

    # Woodbury: (c I + U C Uᵀ) y = g with the rank-2 symmetrised form of RankOneNewton
    u = torch.randn(d, dtype=torch.float64)
    u /= u.norm()
    h = hv(u)
    C = (d / 2) * torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    c = 10.0
    M = c * torch.eye(d, dtype=torch.float64) + (d / 2) * (torch.outer(h, u) + torch.outer(u, h))
    g = torch.func.grad(loss)(x)
    record(
        "lowrank_solve, rank 2 (Woodbury)",
        torch.linalg.solve(M, g),
        lambda: linalg.lowrank_solve(c, [h, u], C, g),
    )
    # Empirical Fisher with 8 per-sample gradients (k = 8)
    idx = torch.arange(8)
    xs = x.clone().requires_grad_()
    per_loss = torch.nn.functional.softplus(-b[idx] * (A[idx] @ xs))
    G = curvature.per_sample_grads(per_loss, [xs])[0] / 8**0.5
    M = 1e-2 * torch.eye(d, dtype=torch.float64) + G.T @ G
    record(
        "lowrank_solve, rank 8 (empirical Fisher)",
        torch.linalg.solve(M, g),
        lambda: linalg.lowrank_solve(1e-2, list(G), torch.eye(8, dtype=torch.float64), g),
    )

    inc = linalg.IncrementalInverse(d, 1e-2)
    for row in G:
        inc.update(row)
    record("IncrementalInverse, 8 updates", torch.linalg.inv(M), lambda: inc.inverse)

    print(
        f"data: {name}, n = {n}, d = {d}, λ = {LAM}; condition number of H: "
        f"{float(eig[-1] / eig[0]):.3g}"
    )
    print(f"{'routine (vs dense float64)':46s} {'rel. error':>11s} {'HVPs':>6s} {'time ms':>9s}")
    for what, err, n_hvp, dt in rows:
        print(f"{what:46s} {err:11.2e} {n_hvp:6d} {1e3 * dt:9.2f}")
    return rows


if __name__ == "__main__":
    main()
