"""NewtonLearn: distributed Newton with learned, compressed Hessian coefficients.

Generalised linear model over ``n`` nodes with ``m`` rows ``(a_ij, b_ij)`` each,

    P(x) = (1/n) Σ_i f_i(x) + (λ/2)‖x‖²,   f_i(x) = (1/m) Σ_j φ(a_ijᵀx, b_ij),
    H(x) = (1/(nm)) Σ_ij h_ij(x) a_ij a_ijᵀ,   h_ij(x) = φ''(a_ijᵀx, b_ij).

Node ``i`` learns the vector ``h_i^k ≈ h_i(x*)`` from compressed messages
``C(h_i(x^k) − h_i^k)`` (DIANA's trick applied to the Hessian's coefficients), so the server's
Hessian estimate changes by a few rank-one terms per iteration and the uplink costs about as much
as gradient descent's. Variants (``η`` the learning rate, ``C`` a fresh compressor draw per node
and iteration):

* NL1 (Algorithm 1; ``λ > 0``, convex ``φ``)::

      h_i^{k+1} = [h_i^k + η C(h_i(x^k) − h_i^k)]_+
      x^{k+1}   = x^k − (H^k + λI)⁻¹ ∇P(x^k)
      H^{k+1}   = H^k + (1/(nm)) Σ_ij (h_ij^{k+1} − h_ij^k) a_ij a_ijᵀ

* NL2 (Algorithm 2; ``P`` strongly convex, ``|h| ≤ γ``, ``λ ≥ 0``)::

      h_i^{k+1} = h_i^k + η C(h_i(x^k) − h_i^k)
      β^k = max_ij (h_ij(x^k) + 2γ) / (h_ij^k + 2γ)
      H^k = β^k A^k − 2γ B,   B = (1/(nm)) Σ_ij a_ij a_ijᵀ
      x^{k+1} = x^k − (H^k + λI)⁻¹ ∇P(x^k)
      A^{k+1} = A^k + (1/(nm)) Σ_ij (h_ij^{k+1} − h_ij^k) a_ij a_ijᵀ,
      A^0 = (1/(nm)) Σ_ij (h_ij^0 + 2γ) a_ij a_ijᵀ

  ``H^k ⪰ ∇²f(x^k)``, so ``H^k + λI`` is positive definite.

* CNL (cubic NEWTON-LEARN, as reconstructed from the authors' code): NL2's learning and
  Hessian model, and the cubic-regularised step

      x^{k+1} = x^k + argmin_s ⟨∇P(x^k), s⟩ + ½⟨(H^k + λI)s, s⟩ + (M/6)‖s‖³,

  solved exactly by :func:`cubic_step`; ``M = ν R³`` (``ν = sup|φ'''|``, ``R = max‖a_ij‖``)
  makes the model an upper bound of ``P`` and the method globally convergent.

Solves are in float64 (``d ≤ 4096``): a Cholesky factorisation of ``H^k + λI`` per iteration, or
(NL1, ``solver="cholesky_update"``) the factor updated by one rank-one update/downdate per learned
change (:func:`cholesky_rank_one_update`), which wins when ``d`` is large and few coefficients
change. Hessian accumulation goes through ``_ext.gathered_outer_accumulate`` (the compiled
``csrc`` kernel when built).

Reference: R. Islamov, X. Qian, P. Richtárik, "Distributed second order methods with fast rates
and compressed communication", ICML 2021, Algorithms 1 and 2.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _ext
from .._random import owned_generator
from ..distributed import accounting as acc
from ..distributed.compressors import Compressor, RandK
from ..distributed.protocol import CollectiveTransport, SimulatedTransport

__all__ = [
    "GLMLoss",
    "NewtonLearn",
    "glm_loss",
    "glm_newton",
    "learn_coefficients",
    "newton_direction",
    "cubic_step",
    "cholesky_rank_one_update",
]

VARIANTS = ("nl1", "nl2", "cnl")
SOLVERS = ("cholesky", "cholesky_update")
MAX_FLOAT64_SOLVE = 4096  # d up to which the d×d algebra defaults to float64
SPARSE_DENSITY = 0.25  # below this fraction of nonzeros the matvecs go through CSR copies


# --------------------------------------------------------------------------------------------
# The loss φ(t, b) and its derivatives
# --------------------------------------------------------------------------------------------


class GLMLoss(NamedTuple):
    """``φ``, ``φ'``, ``φ''`` (elementwise in the margin ``t`` and label ``b``); ``gamma`` =
    sup|φ''| and ``nu`` = sup|φ'''| where known (``None`` for a custom loss)."""

    value: Callable[[Tensor, Tensor], Tensor]
    d1: Callable[[Tensor, Tensor], Tensor]
    d2: Callable[[Tensor, Tensor], Tensor]
    gamma: float | None
    nu: float | None


def _logistic(t: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.softplus(-b * t)


def _squared(t: Tensor, b: Tensor) -> Tensor:
    return 0.5 * (t - b) ** 2


_BUILTIN = {
    # φ = log(1 + e^{−bt}); φ' = −b σ(−bt); φ'' = b² σ(bt) σ(−bt) ≤ 1/4 (b = ±1);
    # |φ'''| = |σ(1−σ)(1−2σ)| ≤ 1/(6√3)
    "logistic": GLMLoss(
        _logistic,
        lambda t, b: -b * torch.sigmoid(-b * t),
        lambda t, b: b * b * torch.sigmoid(b * t) * torch.sigmoid(-b * t),
        0.25,
        1.0 / (6.0 * math.sqrt(3.0)),
    ),
    "squared": GLMLoss(_squared, lambda t, b: t - b, lambda t, b: torch.ones_like(t + b), 1.0, 0.0),
}


def glm_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> GLMLoss:
    """``"logistic"``, ``"squared"`` (closed forms) or a twice-differentiable scalar function
    ``φ(t, b)`` of torch scalars, whose ``φ'`` and ``φ''`` come from ``torch.func``
    (``vmap(grad(φ))``, ``vmap(grad(grad(φ)))``) and are applied elementwise."""
    if isinstance(loss, str):
        if loss not in _BUILTIN:
            raise ValueError(f"loss must be one of {sorted(_BUILTIN)} or a callable, got {loss!r}")
        return _BUILTIN[loss]
    if not callable(loss):
        raise TypeError(f"loss must be a string or a callable phi(t, b), got {type(loss).__name__}")
    from torch.func import grad, vmap

    d1 = grad(loss)
    return GLMLoss(vmap(loss), vmap(d1), vmap(grad(d1)), None, None)


# --------------------------------------------------------------------------------------------
# Node side
# --------------------------------------------------------------------------------------------


class _Shard:
    """A node-side feature matrix: the dense rows (gathered for the Hessian updates) and, when
    sparse enough, CSR copies of ``A`` and ``Aᵀ`` for the matrix products (w8a is 4 % dense:
    about 20× faster margins and gradients than dense products)."""

    def __init__(self, A: Tensor) -> None:
        self.A = A.contiguous()
        density = float((A != 0).sum()) / max(A.numel(), 1)
        self.csr = self.csr_t = None
        if density < SPARSE_DENSITY:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self.csr = self.A.to_sparse_csr()
                self.csr_t = self.A.T.contiguous().to_sparse_csr()

    def mv(self, x: Tensor) -> Tensor:
        """``A x``."""
        return (self.csr if self.csr is not None else self.A) @ x

    def rmm(self, W: Tensor) -> Tensor:
        """``Aᵀ W`` for a vector or matrix ``W``."""
        return self.csr_t @ W if self.csr_t is not None else self.A.T @ W

    def weighted_gram(self, w: Tensor) -> Tensor:
        """``Aᵀ diag(w) A`` (a node's local Hessian model, sent once at initialisation)."""
        return self.rmm(self.A * w[:, None])


def glm_node_terms(
    shard: _Shard, b: Tensor, x: Tensor, loss: GLMLoss
) -> tuple[Tensor, Tensor, Tensor]:
    """What the nodes compute at ``x``, summed over their rows: ``(Σ φ, Σ φ' a, h)`` with
    ``h = φ''(Ax, b)`` per row. One product ``Ax`` and one ``Aᵀφ'`` for all local nodes."""
    t = shard.mv(x)
    return loss.value(t, b).sum(), shard.rmm(loss.d1(t, b)), loss.d2(t, b)


def learn_coefficients(
    variant: str, h: Tensor, hx: Tensor, message: Tensor, eta: float, gamma: float | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One learning step for all local nodes (rows of ``h``, shape ``(nodes, m)``).

    ``message = C(h(x^k) − h^k)``. Returns ``(h^{k+1}, h^{k+1} − h^k, β)``: NL1 projects,
    ``h^{k+1} = [h^k + η·message]_+``, and has no β; NL2/CNL take ``h^k + η·message`` and
    ``β = max_ij (h_ij(x^k) + 2γ)/(h_ij^k + 2γ)`` over the local nodes (0-d).
    """
    if variant == "nl1":
        h_new = (h + eta * message).clamp_min_(0.0)
        return h_new, h_new - h, None
    change = eta * message
    beta = ((hx + 2 * gamma) / (h + 2 * gamma)).amax()
    return h + change, change, beta


# --------------------------------------------------------------------------------------------
# Server side: the d×d algebra
# --------------------------------------------------------------------------------------------


def _shifted(H: Tensor, lam: float) -> Tensor:
    out = H.clone()
    out.diagonal().add_(lam)
    return out


def newton_direction(Hreg: Tensor, g: Tensor) -> Tensor:
    """``Hreg⁻¹ g`` by Cholesky; NaN (never garbage) when ``Hreg`` is not positive definite."""
    L, info = torch.linalg.cholesky_ex(Hreg)
    return _solve_with_factor(L, g, info == 0)


def _solve_with_factor(L: Tensor, g: Tensor, ok: Tensor | bool = True) -> Tensor:
    y = torch.cholesky_solve(g[:, None], L).squeeze(1)
    return torch.where(torch.as_tensor(ok, device=y.device), y, torch.nan)


def cholesky_rank_one_update(L: Tensor, z: Tensor, alpha: float | Tensor) -> tuple[Tensor, bool]:
    """The Cholesky factor of ``L Lᵀ + α z zᵀ`` in ``O(d²)`` (update for α > 0, downdate α < 0).

    With ``p = L⁻¹ z``, ``L Lᵀ + α z zᵀ = L (I + α p pᵀ) Lᵀ`` and ``I + α p pᵀ = M D Mᵀ`` with
    ``M`` unit lower triangular, ``M_rj = β_j p_r`` (``r > j``): Gill, Golub, Murray and
    Saunders' method C1 (Math. Comp. 1974) with ``D = I``, whose recurrence
    ``1/α_{j+1} = 1/α_j + p_j²`` is a cumulative sum, ``D_jj = α_j/α_{j+1}``,
    ``β_j = p_j α_{j+1}``. Then ``L' = (L M) D^{1/2}`` and column ``j`` of ``L M`` is
    ``L_j + β_j Σ_{r>j} p_r L_r`` (a reverse cumulative sum): vector operations only.

    Returns ``(L', ok)``; ``ok`` is False when the downdate leaves the positive definite cone
    (or rounding makes it look so) — the caller refactors then.
    """
    p = torch.linalg.solve_triangular(L, z[:, None], upper=False).squeeze(1)
    inv_next = 1.0 / alpha + torch.cumsum(p * p, 0)  # 1/α_{j+1}
    inv = torch.cat([inv_next.new_full((1,), 1.0 / float(alpha)), inv_next[:-1]])  # 1/α_j
    dbar = inv_next / inv
    beta = p / inv_next
    Lp = L * p
    tail = Lp.flip(1).cumsum(1).flip(1) - Lp  # Σ_{r>j} p_r L[:, r]
    out = (L + tail * beta) * dbar.clamp_min(0).sqrt()
    ok = bool((dbar > 0).all()) and bool(torch.isfinite(out).all())
    return out, ok


def cubic_step(
    Hreg: Tensor, g: Tensor, M: float, *, tol: float = 1e-15, max_iter: int = 100
) -> Tensor:
    """The exact minimiser ``s`` of ``⟨g, s⟩ + ½⟨Hreg s, s⟩ + (M/6)‖s‖³`` (Nesterov–Polyak).

    ``s`` is characterised by ``(Hreg + (M r/2) I) s = −g``, ``r = ‖s‖``,
    ``Hreg + (M r/2) I ⪰ 0``. With ``Hreg = Q diag(μ) Qᵀ`` (one eigendecomposition) and
    ``g̃ = Qᵀ g``, ``w(r) = ‖g̃ / (μ + M r/2)‖`` decreases on ``r > r_lo = max(0, −2μ_min/M)``
    and the root of ``w(r) = r`` lies in ``[r_lo, r_hi]``,
    ``r_hi = (−μ_min + sqrt(μ_min² + 2M‖g‖))/M``. It is found by Newton's method on the
    secular equation ``1/w(r) − 1/r = 0`` (nearly linear in ``r``), safeguarded by bisection.
    Hard case (``g`` orthogonal to the bottom eigenvectors and ``w(r_lo) < r_lo``): ``r = r_lo``
    and the missing norm goes along the bottom eigenvector. ``M = 0``: the Newton step
    (``Hreg`` must be positive definite). The 1-D solve runs on the host in float64.
    """
    if M == 0:
        return -newton_direction(Hreg, g)
    mu, Q = torch.linalg.eigh(Hreg)
    gt = Q.T @ g
    mu_h, gt_h = mu.double().cpu(), gt.double().cpu()
    mu_min = float(mu_h[0])
    g2 = gt_h * gt_h
    lo = max(0.0, -2.0 * mu_min / M)
    hi = max(lo, (-mu_min + math.sqrt(mu_min**2 + 2 * M * float(g2.sum().sqrt()))) / M)

    shift_lo = mu_h + M * lo / 2
    # eigen-directions whose shifted curvature vanishes at r_lo (only when μ_min ≤ 0)
    keep = shift_lo > 1e-12 * max(1.0, float(mu_h.abs().max()))
    coef = torch.where(keep, -gt_h / torch.where(keep, shift_lo, 1.0), 0.0)
    if not bool(keep.all()) and float(coef.norm()) <= lo:
        # hard case: those directions carry no gradient; r = r_lo and the missing norm goes
        # along the bottom eigenvector
        coef[0] = math.sqrt(max(lo * lo - float((coef * coef).sum()), 0.0))
        return Q @ coef.to(Q.dtype).to(Q.device)
    r = hi
    for _ in range(max_iter):
        shift = mu_h + M * r / 2
        wr = float((g2 / shift**2).sum().sqrt())
        if abs(wr - r) <= tol * r or hi - lo <= tol * hi:
            break
        if wr > r:
            lo = r
        else:
            hi = r
        # F(r) = 1/w − 1/r,  F'(r) = (M/2) Σ g̃²/shift³ / w³ + 1/r²
        f = 1.0 / wr - 1.0 / r
        df = (M / 2) * float((g2 / shift**3).sum()) / wr**3 + 1.0 / r**2
        r_new = r - f / df
        r = r_new if lo < r_new < hi else 0.5 * (lo + hi)
    return -(Q @ (gt / (mu + M * r / 2)))


def glm_newton(
    features: Tensor,
    targets: Tensor,
    *,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "logistic",
    lam: float = 1e-3,
    iterations: int = 25,
    x0: Tensor | None = None,
) -> tuple[Tensor, list[float]]:
    """Exact Newton on ``P`` in float64: ``x ← x − ∇²P(x)⁻¹ ∇P(x)``; returns ``(x, [P(x^k)])``
    (``P(x^k)`` for ``k = 0..iterations``). The optimum (20+ Newton iterations) and the
    baseline of the benchmarks."""
    A, b = features.double(), targets.double()
    shard, phi = _Shard(A), glm_loss(loss)
    x = A.new_zeros(A.shape[1]) if x0 is None else x0.to(A).clone()
    values = []
    for _ in range(iterations + 1):
        t = shard.mv(x)
        values.append(float(phi.value(t, b).mean() + lam / 2 * x.dot(x)))
        if len(values) > iterations:
            break
        g = shard.rmm(phi.d1(t, b)) / len(b) + lam * x
        x = x - newton_direction(_shifted(shard.weighted_gram(phi.d2(t, b)) / len(b), lam), g)
    return x, values


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any, *, strict: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (strict and value == 0):
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}"
        )
    return float(value)


class NewtonLearn(torch.optim.Optimizer):
    r"""NEWTON-LEARN (NL1, NL2) and CUBIC-NEWTON-LEARN for GLMs.

    Update formulas (``C`` a fresh compressor draw per node and iteration):

    - ``"nl1"``: :math:`h_i^{k+1} = [h_i^k + \eta C(h_i(x^k) - h_i^k)]_+`,
      :math:`x^{k+1} = x^k - (H^k + \lambda I)^{-1}\nabla P(x^k)`,
      :math:`H^{k+1} = H^k + \frac{1}{nm}\sum_{ij}(h^{k+1}_{ij} - h^k_{ij}) a_{ij}a_{ij}^\top`.
    - ``"nl2"``: :math:`h_i^{k+1} = h_i^k + \eta C(h_i(x^k) - h_i^k)`,
      :math:`\beta^k = \max_{ij} \frac{h_{ij}(x^k) + 2\gamma}{h^k_{ij} + 2\gamma}`,
      :math:`H^k = \beta^k A^k - 2\gamma B`, :math:`B = \frac{1}{nm}\sum_{ij} a_{ij}a_{ij}^\top`,
      :math:`x^{k+1} = x^k - (H^k + \lambda I)^{-1}\nabla P(x^k)`,
      :math:`A^{k+1} = A^k + \frac{1}{nm}\sum_{ij}(h^{k+1}_{ij} - h^k_{ij}) a_{ij}a_{ij}^\top`.
    - ``"cnl"``: NL2's learning and :math:`H^k`, and
      :math:`x^{k+1} = x^k + \arg\min_s \langle\nabla P(x^k), s\rangle
      + \tfrac12\langle(H^k + \lambda I)s, s\rangle + \tfrac{M}{6}\|s\|^3` (exact, see
      :func:`cubic_step`).

    ``step()`` takes no closure (the optimizer owns the data) and returns :math:`P(x^k)` at the
    point it started from, a 0-d tensor.

    Args:
        params: One parameter with ``d`` elements, the weight vector ``x`` (``(d,)`` or
            ``(1, d)`` as ``nn.Linear(d, 1, bias=False).weight``). Its value is ``x^0``.
        features: ``(rows, d)`` — simulated mode: all ``n·m`` rows, node ``i`` holding rows
            ``[i·m, (i+1)·m)``; ``torch.distributed`` mode: this rank's ``L·m`` rows.
        targets: ``(rows,)`` labels ``b_ij`` (±1 for logistic).
        loss: ``"logistic"``, ``"squared"`` or a function ``φ(t, b)`` of torch scalars
            (derivatives by ``torch.func``; then ``gamma`` and, for CNL, ``cubic_reg`` are needed).
        lam: ``λ`` (> 0 for NL1).
        variant: ``"nl1"``, ``"nl2"`` or ``"cnl"``.
        compressor: For the learning messages (default ``RandK(1)``).
        eta: Learning rate ``η``; default ``1/(ω + 1)`` with ``ω = compressor.omega(m)``.
        gamma: NL2/CNL's ``γ ≥ sup|φ''|``; default 1/4 (logistic), 1 (squared).
        cubic_reg: CNL's ``M``; default ``ν R³``, ``ν = sup|φ'''|``, ``R = max‖a_ij‖``.
        option: 1 — the nodes send the ``a_ij`` of the changed coefficients (server without
            data, counted in the bits); 2 — the server is assumed to hold them.
        num_nodes: Simulated mode: ``n`` (rows must be divisible by it; e.g. drop a9a's
            remainder row). ``torch.distributed`` mode: nodes on this rank (default 1).
        process_group: Run the protocol over ``torch.distributed`` on this group (default: the
            default group when ``torch.distributed`` is initialised, else simulated nodes).
        server_rank: Group rank of the server (it also holds a shard).
        generator: Source of the compressors' randomness (drawn for all nodes, in node order,
            on every rank; the server's state is broadcast at construction). Default: one
            derived from ``torch.initial_seed()``.
        accounting: ``"realistic"`` (all nodes, Option-aware) or ``"paper"`` (the authors'
            one-node count); see :mod:`torch_rankone.distributed.accounting`.
        h0: Initial coefficients ``(n·m,)`` or ``(nodes, m)`` (this rank's); default
            ``h_i(x^0)``.
        solver: ``"cholesky"`` (refactor ``H^k + λI`` every iteration) or, NL1 only,
            ``"cholesky_update"`` (rank-one updates/downdates of the factor).
        solve_dtype: dtype of the server's ``d×d`` algebra; default float64 for ``d ≤ 4096``.

    State (``opt.state[param]``, saved by ``state_dict``): ``h`` (learned coefficients of this
    rank's nodes), ``H`` (NL1) or ``A``, ``B`` (NL2/CNL) on the server, ``chol`` (update
    solver), ``step``, ``skipped_steps`` (non-finite steps not applied), ``bits_sent``
    (cumulative, with initialisation) and ``generator_state``. ``opt.history``: per iteration
    ``{"loss": P(x^k), "bits": cumulative bits after it, "time": cumulative step seconds}``.

    Synchronisation: each step reads the number of changed coefficients on the host (the size
    of the messages), and CNL's 1-D secular solve runs on the host.

    Example (logistic regression over 4 simulated nodes, 1 coordinate per message):
        >>> import torch
        >>> from torch_rankone import NewtonLearn
        >>> from torch_rankone.distributed import RandK
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(40, 5, generator=g, dtype=torch.float64)
        >>> b = torch.where(A[:, 0] > 0, 1.0, -1.0).to(torch.float64)
        >>> x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        >>> opt = NewtonLearn(
        ...     [x], A, b, loss="logistic", lam=0.1, variant="nl1", compressor=RandK(1),
        ...     num_nodes=4, generator=g,
        ... )
        >>> losses = [float(opt.step()) for _ in range(30)]
        >>> losses[-1] < 0.6 * losses[0]
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "logistic",
        lam: float = 1e-3,
        variant: str = "nl1",
        compressor: Compressor | None = None,
        eta: float | None = None,
        gamma: float | None = None,
        cubic_reg: float | None = None,
        option: int = 1,
        num_nodes: int | None = None,
        process_group: Any = None,
        server_rank: int = 0,
        generator: torch.Generator | None = None,
        accounting: str = "realistic",
        h0: Tensor | None = None,
        solver: str = "cholesky",
        solve_dtype: torch.dtype | None = None,
    ) -> None:
        compressor = RandK(1) if compressor is None else compressor
        phi = glm_loss(loss)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        lam = _check_positive("lam", lam, strict=variant == "nl1")
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a Compressor, got {type(compressor).__name__}")
        if option not in (1, 2):
            raise ValueError(f"option must be 1 or 2, got {option!r}")
        if accounting not in acc.ACCOUNTINGS:
            raise ValueError(f"accounting must be one of {acc.ACCOUNTINGS}, got {accounting!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "cholesky_update" and variant != "nl1":
            raise ValueError(
                "solver='cholesky_update' applies to variant='nl1' only (NL2/CNL rescale the "
                "whole matrix by β every iteration)"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

        super().__init__(params, dict(lam=lam))
        plist = [p for g in self.param_groups for p in g["params"]]
        if len(plist) != 1:
            raise ValueError(f"params must hold exactly one tensor (x), got {len(plist)}")
        (p,) = plist
        d = p.numel()
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != d:
            raise ValueError(
                f"features must be a (rows, d={d}) tensor matching the parameter's {d} elements, "
                f"got {getattr(features, 'shape', type(features).__name__)}"
            )
        if not features.is_floating_point() or features.dtype != p.dtype:
            raise TypeError(
                f"features must have the parameter's dtype {p.dtype}, got {features.dtype}"
            )
        if features.device != p.device:
            raise ValueError(f"features are on {features.device}, the parameter on {p.device}")
        if not isinstance(targets, Tensor) or targets.shape != features.shape[:1]:
            raise ValueError(
                f"targets must be a tensor of shape ({features.shape[0]},), "
                f"got {getattr(targets, 'shape', type(targets).__name__)}"
            )

        distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        self.transport = (
            CollectiveTransport(process_group, server_rank) if distributed else SimulatedTransport()
        )
        nodes = 1 if num_nodes is None else num_nodes
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        rows = features.shape[0]
        if rows % nodes or rows == 0:
            raise ValueError(
                f"features has {rows} rows, not divisible into num_nodes={nodes} equal shards; "
                f"drop the remainder (e.g. features[:{nodes * (rows // nodes)}]) as the paper does"
            )
        m = rows // nodes
        self.local_nodes, self.m, self.d = nodes, m, d
        self.num_nodes = nodes * self.transport.world_size
        self.compressor, self.loss = compressor, phi
        if accounting == "paper":
            acc.paper_r(compressor, m)  # refuses compressors the authors' count does not cover
        if variant != "nl1" and gamma is None and phi.gamma is None:
            raise ValueError("gamma (>= sup|phi''|) is needed for a custom loss with nl2/cnl")
        # the options live in the param group (repr, state_dict and checkpoints see them)
        options = dict(
            variant=variant,
            option=option,
            accounting=accounting,
            solver=solver,
            eta=1.0 / (compressor.omega(m) + 1.0) if eta is None else _check_positive("eta", eta),
            gamma=None
            if variant == "nl1"
            else _check_positive("gamma", phi.gamma if gamma is None else gamma),
            cubic_reg=None,
        )
        self.defaults.update(options)
        self.param_groups[0].update(options)
        self.solve_dtype = solve_dtype or (
            torch.float64 if d <= MAX_FLOAT64_SOLVE else features.dtype
        )
        self.transport.check_agreement(
            dict(
                nodes_per_rank=nodes,
                rows_per_node=m,
                features=d,
                dtype=[torch.float16, torch.bfloat16, torch.float32, torch.float64].index(
                    features.dtype
                ),
                variant=VARIANTS.index(variant),
                option=option,
                solver=SOLVERS.index(solver),
            )
        )

        self.generator = generator
        if generator is None:
            self.generator = owned_generator()
        self.transport.broadcast_generator(self.generator)
        with torch.no_grad():
            p.copy_(self.transport.broadcast_from_server(p.detach()))
        self._shard, self._targets = _Shard(features), targets
        if variant == "cnl":
            if cubic_reg is None:
                if phi.nu is None:
                    raise ValueError("cubic_reg (M) is needed for a custom loss with cnl")
                R = self.transport.max_everywhere(features.norm(dim=1).amax().to(torch.float64))
                cubic_reg = phi.nu * float(R) ** 3
            cubic_reg = _check_positive("cubic_reg", cubic_reg, strict=False)
            self.defaults["cubic_reg"] = self.param_groups[0]["cubic_reg"] = cubic_reg
        self._initialise(p, h0)

    # ---- initialisation --------------------------------------------------------------------

    def _initialise(self, p: Tensor, h0: Tensor | None) -> None:
        """``h^0`` on the nodes; the server's ``H^0`` (NL1) or ``A^0, B`` (NL2/CNL) from the
        nodes' local matrices (the initialisation message)."""
        shape = (self.local_nodes, self.m)
        with torch.no_grad():
            if h0 is None:
                h0 = glm_node_terms(self._shard, self._targets, p.detach().reshape(-1), self.loss)[
                    2
                ]
            elif not isinstance(h0, Tensor) or h0.numel() != self.local_nodes * self.m:
                raise ValueError(f"h0 must be a tensor with {shape[0]}·{shape[1]} elements")
            h = h0.detach().to(device=p.device, dtype=p.dtype).reshape(shape).clone()
            if self.variant == "nl1" and bool((h < 0).any()):
                raise ValueError("h0 must be >= 0 for nl1 (H^0 must be positive semidefinite)")
            nm = self.num_nodes * self.m
            local = [self._shard.weighted_gram(h.reshape(-1))]
            if self.variant != "nl1":
                local.append(self._shard.weighted_gram(torch.ones_like(h.reshape(-1))))
            mats = self.transport.sum_to_server(torch.stack(local).to(self.solve_dtype)) / nm
        state = self.state[p]
        state["history"] = []
        state["h"] = h
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["skipped_steps"] = torch.zeros((), dtype=torch.int64)
        bits = acc.init_bits(
            self.accounting, self.variant, self.option, self.num_nodes, self.m, self.d
        )
        state["bits_sent"] = torch.tensor(bits, dtype=torch.float64)
        if not self.transport.is_server:
            return
        if self.variant == "nl1":
            state["H"] = mats[0].contiguous()
            if self.solver == "cholesky_update":
                state["chol"] = torch.linalg.cholesky(_shifted(state["H"], self._lam))
                state["refactorizations"] = 0
        else:
            state["A"] = (mats[0] + 2 * self.gamma * mats[1]).contiguous()
            state["B"] = mats[1].contiguous()

    @property
    def _lam(self) -> float:
        return self.param_groups[0]["lam"]

    variant = property(lambda self: self.param_groups[0]["variant"], doc="``nl1 | nl2 | cnl``")
    option = property(lambda self: self.param_groups[0]["option"], doc="Option 1 or 2")
    accounting = property(lambda self: self.param_groups[0]["accounting"], doc="bit count")
    solver = property(lambda self: self.param_groups[0]["solver"], doc="the server's solve")
    eta = property(lambda self: self.param_groups[0]["eta"], doc="learning rate of ``h``")
    gamma = property(lambda self: self.param_groups[0]["gamma"], doc="``γ`` (NL2, CNL)")
    cubic_reg = property(lambda self: self.param_groups[0]["cubic_reg"], doc="``M`` (CNL)")

    #: options a checkpoint must share with the optimizer it is loaded into (the state's layout)
    _STRUCTURAL = ("variant", "option", "solver")

    @property
    def _param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    @property
    def global_state(self) -> dict[str, Any]:
        """All of the optimizer's state (``x`` is its only parameter): ``"h"``, ``"step"``,
        ``"skipped_steps"``, ``"bits_sent"``, ``"history"``, the server's ``"H"``/``"A"``, ``"B"``,
        ``"chol"``, ``"refactorizations"``."""
        return self.state[self._param]

    def counters(self) -> dict[str, int]:
        """``{"step": iterations, "skipped_steps": non-finite steps not applied}`` (host ints)."""
        return {key: int(self.global_state[key]) for key in ("step", "skipped_steps")}

    @property
    def history(self) -> list[dict[str, float]]:
        """Per iteration ``{"loss": P(x^k), "bits": cumulative bits, "time": seconds}``; kept in
        the state, so checkpoints (``state_dict``, ``torch.distributed.checkpoint``) carry it."""
        return self.global_state["history"]

    @history.setter
    def history(self, value: list[dict[str, float]]) -> None:
        self.global_state["history"] = value

    # ---- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state of this process. Distributed, every rank holds its own nodes' ``h`` (and
        the server the matrices): save and load each rank's ``state_dict`` with ``torch.save``
        (``torch.distributed.checkpoint`` needs one process, where the state is global)."""
        self.global_state["generator_state"] = self.generator.get_state()
        out = super().state_dict()
        # a tuple: distributed checkpoints store it whole (a list of dicts would be flattened
        # into entries that a fresh optimizer's empty history has no place for)
        ((index, entry),) = out["state"].items()
        out["state"][index] = {**entry, "history": tuple(dict(h) for h in self.history)}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_group = state_dict["param_groups"][0]
        for key in self._STRUCTURAL:
            if key in saved_group and saved_group[key] != self.param_groups[0][key]:
                raise ValueError(
                    f"NewtonLearn.load_state_dict: the checkpoint has {key}="
                    f"{saved_group[key]!r}, this optimizer {self.param_groups[0][key]!r}; build "
                    "the optimizer with the checkpoint's options (nothing was changed)"
                )
        current = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        super().load_state_dict(state_dict)
        for key, value in current.items():  # version 0.1 saved only lam
            self.param_groups[0].setdefault(key, value)
        # the base class casts floating state to the parameter's dtype; the d×d matrices are
        # float64 on purpose and must come back exactly (on the parameter's device)
        (saved,) = state_dict["state"].values()
        state, device = self.global_state, self._param.device
        for key, value in saved.items():
            state[key] = value.to(device, copy=True) if isinstance(value, Tensor) else value
        self.generator.set_state(state["generator_state"].to("cpu", torch.uint8))
        # version 0.1 kept the history next to the state
        self.history = [dict(h) for h in saved.get("history", state_dict.get("history", []))]

    # ---- one iteration ---------------------------------------------------------------------

    def _compress(self, delta: Tensor) -> Tensor:
        """``C(delta)`` per local node, the randomness drawn for all ``n`` nodes in node order
        (so every rank, and the simulated run, consume the generator identically)."""
        if self.transport.world_size == 1:
            return self.compressor(delta, self.generator)
        full = delta.new_zeros(self.num_nodes, self.m)
        start = self.transport.rank * self.local_nodes
        full[start : start + self.local_nodes] = delta
        return self.compressor(full, self.generator)[start : start + self.local_nodes]

    def _exchange(self, idx: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The learning messages' rows on the server: ``(rows, index, coef)`` such that the
        Hessian update is ``Σ_t coef_t rows[index_t] rows[index_t]ᵀ``. Simulated: the
        feature matrix itself. Distributed: ``[coef, a_ij]`` rows gathered (zero-padded to the
        longest message; padding has ``coef = 0`` and is dropped)."""
        if self.transport.world_size == 1:
            return self._shard.A, idx, coef
        width = int(self.transport.max_everywhere(torch.tensor([idx.numel()]))[0])
        msg = torch.cat([coef[:, None], self._shard.A.index_select(0, idx)], 1)
        msg = torch.nn.functional.pad(msg.to(self.solve_dtype), (0, 0, 0, width - idx.numel()))
        got = self.transport.gather_to_server(msg)
        got = got[got[:, 0] != 0]
        return got[:, 1:], torch.arange(got.shape[0], device=got.device), got[:, 0]

    @torch.no_grad()
    def step(self, closure: None = None) -> Tensor:
        """One iteration; returns ``P(x^k)`` at the starting point (0-d tensor)."""
        if closure is not None:
            raise TypeError(
                "NewtonLearn.step() takes no closure: the optimizer owns the data "
                "(features/targets) and evaluates P itself"
            )
        start = time.perf_counter()
        p, lam, d, nm = self._param, self._lam, self.d, self.num_nodes * self.m
        state = self.state[p]
        x = p.detach().reshape(-1)

        # nodes: gradient sums, coefficients h(x^k), compressed learning messages
        loss_sum, grad_sum, hx = glm_node_terms(self._shard, self._targets, x, self.loss)
        h = state["h"]
        hx = hx.reshape(h.shape)
        message = self._compress(hx - h)
        h_new, change, beta = learn_coefficients(self.variant, h, hx, message, self.eta, self.gamma)
        idx = change.reshape(-1).nonzero().squeeze(1)  # the a_ij to send (host sync: the count)
        coef = change.reshape(-1).index_select(0, idx) / nm
        local_bits = acc.realistic_iteration_bits(
            self.variant,
            self.option,
            self.local_nodes,
            d,
            float(self.compressor.message_bits(message).sum()),
            idx.numel(),
        )
        sums = self.transport.sum_to_server(
            torch.cat([grad_sum, loss_sum[None], grad_sum.new_tensor([local_bits])]).to(
                self.solve_dtype
            )
        )
        if beta is not None:
            beta = self.transport.max_everywhere(beta.to(self.solve_dtype))
        rows, ridx, rcoef = self._exchange(idx, coef)

        # server: the Newton-type step, then the Hessian model's update
        payload = torch.empty(d + 2, dtype=self.solve_dtype, device=x.device)
        if self.transport.is_server:
            xs = x.to(self.solve_dtype)
            grad = sums[:d] / nm + lam * xs
            payload[d] = sums[d] / nm + lam / 2 * xs.dot(xs)
            payload[d + 1] = sums[d + 1]
            step = self._server_direction(state, grad, beta)
            ok = torch.isfinite(step).all()
            payload[:d] = torch.where(ok, xs - step, xs)
            state["skipped_steps"] += (~ok).to(torch.int64).cpu()
            self._server_accumulate(state, rows, ridx, rcoef)
        payload = self.transport.broadcast_from_server(payload)

        p.copy_(payload[:d].to(p.dtype).view_as(p))
        state["h"] = h_new
        state["step"] += 1
        if self.accounting == "paper":
            it_bits = acc.paper_iteration_bits(self.variant, self.compressor, self.m, d)
        else:
            it_bits = float(payload[d + 1])
        state["bits_sent"] += it_bits
        elapsed = time.perf_counter() - start + (self.history[-1]["time"] if self.history else 0.0)
        loss = payload[d].to(p.dtype)
        self.history.append(
            {"loss": float(loss), "bits": float(state["bits_sent"]), "time": elapsed}
        )
        return loss

    def _server_direction(self, state: dict, grad: Tensor, beta: Tensor | None) -> Tensor:
        """``(H^k + λI)⁻¹ ∇P`` (NL1/NL2) or minus the cubic step (CNL)."""
        lam = self._lam
        if self.variant == "nl1":
            if self.solver == "cholesky_update":
                return _solve_with_factor(state["chol"], grad)
            return newton_direction(_shifted(state["H"], lam), grad)
        Hk = beta * state["A"] - 2 * self.gamma * state["B"]
        if self.variant == "nl2":
            return newton_direction(_shifted(Hk, lam), grad)
        return -cubic_step(_shifted(Hk, lam), grad, self.cubic_reg)

    def _server_accumulate(self, state: dict, rows: Tensor, idx: Tensor, coef: Tensor) -> None:
        """``H`` (or ``A``) ``+= Σ_t coef_t a_t a_tᵀ``; the update solver also moves the factor
        one rank-one term at a time (refactoring if a downdate fails)."""
        M = state["H" if self.variant == "nl1" else "A"]
        coef = coef.to(M.dtype)
        if rows.dtype != M.dtype:  # e.g. float32 features, float64 algebra
            rows, idx = rows.index_select(0, idx).to(M.dtype), torch.arange(idx.numel())
        _ext.gathered_outer_accumulate(M, rows, idx, coef)  # checks a host idx for free
        if self.solver != "cholesky_update":
            return
        chol = state["chol"]
        for t in range(idx.numel()):
            chol, ok = cholesky_rank_one_update(chol, rows[idx[t]].to(M.dtype), coef[t])
            if not ok:
                chol = torch.linalg.cholesky(_shifted(M, self._lam))
                state["refactorizations"] += 1
                break
        state["chol"] = chol
